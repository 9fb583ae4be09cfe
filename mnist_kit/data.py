"""MNIST held in memory as tensors, its loaders, and the checks that say what is wrong with its files."""

import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import MNIST

from mnist_kit.errors import RunError, shown
from mnist_kit.files import read_whole
from mnist_kit.signals import worker_ignores_stop_signals

MNIST_MEAN = 0.1307  # mean pixel value of the MNIST training images, scaled to [0, 1]
MNIST_STD = 0.3081  # and their standard deviation
VAL_FRACTION = 1 / 12  # 5,000 of the 60,000 training images are held out for validation
SPLIT_SEED = 42  # fixed, so every run validates on the same 5,000 images
MNIST_CLASSES = 10  # its labels are the digits 0-9


class MNISTTensors(Dataset):
    """One MNIST split as uint8 tensors; each batch is built with one indexing operation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images  # (N, 28, 28) uint8
        self.labels = labels  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The DataLoader hands over the whole batch of indices at once, so a batch is one
        # gather and one normalisation, where the video made 100 PIL images and stacked them.
        index = torch.as_tensor(indices)
        images = self.images[index].unsqueeze(1).float().div_(255)
        return images.sub_(MNIST_MEAN).div_(MNIST_STD), self.labels[index]


def _as_built(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate function: MNISTTensors.__getitems__ built the batch already."""
    return batch


class EveryImageOnce(DistributedSampler):
    """Under DDP, each process takes every n-th image of a validation or test set."""

    # Lightning gives each process a DistributedSampler, which repeats a few images so that all
    # get as many, and those would count twice in the accuracy. Lightning leaves a sampler of
    # this class alone: with it the processes share out the images, each exactly once.
    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def mnist_loader(dataset: MNISTTensors, batch_size: int, num_workers: int, shuffle: bool = False) -> DataLoader:
    """A DataLoader of the batches that MNISTTensors builds: shuffled for training, in order
    (and each image once across DDP processes) for validation and test."""
    sampler = EveryImageOnce(dataset) if not shuffle and dist.is_initialized() else None
    # The video's tip was num_workers=4, to decode images in parallel. Here a batch takes
    # microseconds to build, and worker processes would only add the cost of sending every
    # batch between processes: 0 (the main process) is fastest.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_as_built,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_ignores_stop_signals,
    )


MNIST_FILES = [Path(archive).stem for archive, _ in MNIST.resources]  # train-images-idx3-ubyte, ...
IDX_MAGIC = {"images": bytes.fromhex("00000803"), "labels": bytes.fromhex("00000801")}  # unsigned bytes, 3 or 1 dims
GZIP_MAGIC = bytes.fromhex("1f8b")
MNIST_FILE_LIMIT = 2**28  # bytes: the largest MNIST file, of the training images, is 47,040,016
REPLACE_MNIST_FILE = "Replace it with an intact copy, or delete it to download MNIST again."


def download_mnist(data_dir: str) -> None:
    """Make the four MNIST files ready in data_dir/MNIST/raw: unpack .gz copies found there and
    download the rest, or say which files are missing and where they belong."""
    raw = Path(data_dir, "MNIST", "raw")
    missing = []
    for name in MNIST_FILES:
        # torchvision unpacks only archives byte-identical to the official ones, and tries to
        # download the others again, so a user's own .gz copies are unpacked here.
        # What the file must hold follows from its official name; a .gz that is not a file is refused.
        if not (raw / name).exists() and (raw / f"{name}.gz").exists():
            gunzip(raw / f"{name}.gz", raw / name, "images" if "-images-" in name else "labels")
        if not (raw / name).exists():
            missing.append(name)
    if not missing:
        return
    try:
        for train in (True, False):
            MNIST(data_dir, train=train, download=True)
    except Exception as error:  # no network, a proxy, a full disk, ...
        cause = str(error).strip().splitlines()[-1]  # torchvision's message lists each address it tried
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise RunError(
            f"{names} {'is' if len(missing) == 1 else 'are'} not in {shown(raw)} and could not be "
            f"downloaded ({cause}). Put {'it' if len(missing) == 1 else 'them'} there (each may be .gz), "
            "or point --data-dir at the folder that holds MNIST/raw/."
        ) from error


def gunzip(archive: Path, target: Path, kind: str) -> None:
    """Unpack a .gz file of MNIST images or labels beside it, or say what is wrong with it."""
    packed = read_whole(archive, REPLACE_MNIST_FILE, MNIST_FILE_LIMIT)
    try:
        unpacked = gunzipped(packed)
    except (OSError, EOFError, zlib.error) as error:  # not gzip, truncated, damaged
        raise RunError(
            f"{shown(archive)} could not be unpacked ({error}): replace it with an intact copy, "
            "or delete it to download it."
        ) from error
    # Checked before it is unpacked: an error about the unpacked file would send the user to
    # delete it, and it would be unpacked again from the same .gz.
    problem = idx_problem(unpacked, kind)
    if problem:
        raise RunError(
            f"{shown(archive)} holds {len(unpacked):,} bytes that are not an MNIST {kind} file: unpacked, "
            f"it {problem}. {REPLACE_MNIST_FILE}"
        )
    # Written beside the target and renamed, so that the target is whole or absent; removed
    # whatever stops the write, a full disk or Ctrl-C, so that nothing is left in the user's folder.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(unpacked)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)


def gunzipped(packed: bytes) -> bytes:
    """What a gzip file unpacks to, as gzip.decompress unpacks it (member after member), but no
    more than MNIST_FILE_LIMIT bytes: a few kilobytes can unpack to terabytes."""
    unpacked, rest = b"", packed
    while rest:
        if rest[:2] != GZIP_MAGIC:
            raise OSError(f"Not a gzipped file ({rest[:2]!r})")
        unpacker = zlib.decompressobj(wbits=31)  # 31: the gzip format, its header and checksum
        unpacked += unpacker.decompress(rest, MNIST_FILE_LIMIT + 1 - len(unpacked))
        if len(unpacked) > MNIST_FILE_LIMIT:
            raise OSError(f"it unpacks to more than {MNIST_FILE_LIMIT:,} bytes, more than any MNIST file")
        if not unpacker.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        rest = unpacker.unused_data.lstrip(b"\x00")  # gzip.decompress skips the zeros that pad a member
    return unpacked


def idx_problem(content: bytes, kind: str) -> str | None:
    """What keeps content from being an MNIST file of images or labels, said of it ("is empty"); None if nothing.

    An IDX file is a magic number that gives the type and number of dimensions, each dimension's
    size as a 4-byte integer, and then the values, one byte each: its size follows from its header."""
    magic = IDX_MAGIC[kind]
    header = idx_header_size(magic)
    if not content:
        return "is empty"
    if content[:2] == GZIP_MAGIC:
        return "is packed with gzip: unpack it, or give it a name that ends in .gz"
    if not magic.startswith(content[:4]):
        return f"starts with 0x{content[:4].hex()}, where MNIST {kind} files start with 0x{magic.hex()}"
    if len(content) < header:
        return f"is {len(content):,} bytes, too few for the {header}-byte header of an MNIST {kind} file"
    sizes = idx_sizes(content)
    if sizes[0] == 0:
        return f"holds no {kind}"
    promised = header + math.prod(sizes)
    if len(content) != promised:
        return f"is {len(content):,} bytes, where its header promises {promised:,}"
    return None


def idx_header_size(content: bytes) -> int:
    """The bytes of an IDX header: the magic number, whose last byte is the number of dimensions, then their sizes."""
    return 4 + 4 * content[3]


def idx_sizes(content: bytes) -> list[int]:
    """The size of each dimension, from an IDX file's header: 4-byte integers after the magic number."""
    return [int.from_bytes(content[start : start + 4], "big") for start in range(4, idx_header_size(content), 4)]


def read_idx(path: Path, kind: str) -> torch.Tensor:
    """One MNIST file as a uint8 tensor of (N, rows, columns) images or (N,) labels, or a RunError
    that names the file and what is wrong with it."""
    # Writable, as torch.frombuffer wants it.
    content = bytearray(read_whole(path, REPLACE_MNIST_FILE, MNIST_FILE_LIMIT))
    problem = idx_problem(content, kind)
    if problem:
        raise RunError(f"{shown(path)} {problem}. {REPLACE_MNIST_FILE}")
    # Read here rather than by torchvision's reader, whose errors name neither the file nor the size it expected.
    return torch.frombuffer(content, dtype=torch.uint8, offset=idx_header_size(content)).view(idx_sizes(content))


def load_mnist(data_dir: str, train: bool) -> MNISTTensors:
    """Read one MNIST split as tensors, or say what is wrong with its files."""
    raw = Path(data_dir, "MNIST", "raw")
    split = "train" if train else "t10k"
    images_file, labels_file = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
    images = read_idx(images_file, "images")
    labels = read_idx(labels_file, "labels").long()  # class indices, as cross_entropy takes them
    # read_idx checks each file on its own, not that the files make a usable data set:
    # wrong ones would otherwise fail in the middle of training, far from the cause.
    if images.shape[1:] != (28, 28):
        height, width = images.shape[1:]
        raise RunError(f"{shown(images_file)} holds {height}x{width} images; MNIST images are 28x28.")
    if len(labels) != len(images):
        raise RunError(
            f"{shown(labels_file)} holds {len(labels)} labels for the {len(images)} images in {shown(images_file)}."
        )
    if len(labels) == 0:
        raise RunError(f"{shown(images_file)} holds no images.")
    if (labels >= MNIST_CLASSES).any():
        raise RunError(
            f"{shown(labels_file)} holds labels up to {labels.max()}; MNIST labels are 0-{MNIST_CLASSES - 1}."
        )
    return MNISTTensors(images, labels)


def load_mnist_train_and_val(data_dir: str) -> tuple[MNISTTensors, MNISTTensors]:
    """The training images, split into a training set and a fixed held-out validation set."""
    full = load_mnist(data_dir, train=True)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_size = round(len(full) * VAL_FRACTION)
    if not 0 < val_size < len(full):
        raise RunError(
            f"the training file in {shown(Path(data_dir, 'MNIST', 'raw'))} holds {len(full)} images: too few to hold "
            "1 in 12 of them out for validation and train on the rest."
        )
    val_index, train_index = order.split([val_size, len(full) - val_size])
    return (
        MNISTTensors(full.images[train_index], full.labels[train_index]),
        MNISTTensors(full.images[val_index], full.labels[val_index]),
    )
