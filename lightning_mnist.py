"""MNIST digit classification with PyTorch Lightning 2.x: the feed-forward net (784 -> 500 ->
ReLU -> 10) of the "convert your PyTorch model to Lightning" tutorial, on the current API.
It trains on 55,000 MNIST images, validates on the other 5,000 training images, and tests
once on the 10,000 test images with the checkpoint that validated best.

    python lightning_mnist.py                  # 2 epochs: about 97.3% test accuracy
    python lightning_mnist.py --fast-dev-run   # one batch through every step, to check the code
    python lightning_mnist.py --predict 7.png  # the digit in your own picture, read by the best checkpoint
    tensorboard --logdir lightning_logs        # the curves, the mistakes, the hyperparameters

Where Lightning 2.x differs from the video, a comment says so at that place.
"""

import argparse
import contextlib
import errno
import gzip
import inspect
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import stat
import sys
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple


def working_folder_problem() -> str | None:
    """What is wrong with the working folder, where runs are kept: gone, or unreadable; None if nothing."""
    try:
        folder = os.getcwd()
    except FileNotFoundError:  # deleted since the shell went into it, which PWD still names
        return f"the working folder {os.environ.get('PWD', '')} no longer exists: cd into a folder that does."
    try:
        os.listdir(folder)
    except OSError as error:
        return f"the working folder {folder} cannot be read ({error.strerror}): cd into a folder you can read."
    return None


# In a deleted working folder, `import torch` kills the process with "Intel oneMKL FATAL ERROR:
# Cannot load libtorch_cpu.so", which names nothing: a command-line run checks before importing it.
if __name__ == "__main__" and (folder_problem := working_folder_problem()):
    sys.exit(f"error: {folder_problem}")

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning_fabric.utilities.seed import pl_worker_init_function
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard.summary import hparams
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.datasets import MNIST
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

# The video's hyperparameters; each is the default of a command-line flag below.
INPUT_SIZE = 28 * 28  # MNIST images are 28x28 pixels, flattened
HIDDEN_SIZE = 500
NUM_CLASSES = 10  # the digits 0-9
NUM_EPOCHS = 2
BATCH_SIZE = 100
LEARNING_RATE = 0.001


class LitNeuralNet(pl.LightningModule):
    """A feed-forward net, 784 -> hidden -> ReLU -> 10, that trains itself on MNIST."""

    def __init__(
        self,
        input_size: int = INPUT_SIZE,
        hidden_size: int = HIDDEN_SIZE,
        num_classes: int = NUM_CLASSES,
        learning_rate: float = LEARNING_RATE,
        batch_size: int = BATCH_SIZE,
        data_dir: str = "./data",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        # Stored in every checkpoint, so `LitNeuralNet.load_from_checkpoint(path)` needs nothing else.
        self.save_hyperparameters()
        self.l1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.l2 = nn.Linear(hidden_size, num_classes)
        # Metrics that add up every batch of an epoch, weighted by its images; Lightning
        # computes them at the end of the epoch, across all processes, and resets them.
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")  # correct images / all images
        self.test_loss = MeanMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def example_input_array(self) -> torch.Tensor:
        # An image for the model summary to show shapes and FLOPs with, of the weights' type:
        # the summary does not convert it to the precision (bf16-true, 64-true, ...) of the run.
        return torch.zeros(1, 1, 28, 28, dtype=self.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.l1(images.flatten(start_dim=1))  # the video's images.reshape(-1, 28 * 28)
        out = self.relu(out)
        return self.l2(out)  # raw scores (logits): cross_entropy applies the softmax itself

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        # The video returned {"loss": loss, "log": {"train_loss": loss}}; Lightning 2.x takes
        # the loss alone, and self.log sends the value to the progress bar and TensorBoard.
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        self.val_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.val_acc.update(logits, labels)
        return logits  # for callbacks such as ValidationPictures

    def on_validation_epoch_end(self) -> None:
        # Lightning 2.x removed the video's validation_epoch_end(outputs), which stacked every
        # step's loss to average them: the metrics have added up the steps as they ran, and
        # Lightning computes them as they are logged. As in the video, the mean loss goes to the
        # progress bar as val_loss and to TensorBoard as avg_val_loss.
        self.log_dict({"val_loss": self.val_loss, "val_acc": self.val_acc}, prog_bar=True)
        self.log("avg_val_loss", self.val_loss)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.test_acc.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        self.log_dict({"test_loss": self.test_loss, "test_acc": self.test_acc})

    def predict_step(self, batch: torch.Tensor, batch_idx: int = 0) -> torch.Tensor:
        # Trainer.predict returns what this returns for each batch of pictures (prepared by
        # prepare_digit below): each picture's probability of being each digit.
        return self(batch).softmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused=True updates all the weights in one go: a step on a CPU is about a tenth faster.
        # TPUs have no fused Adam, and Lightning cannot clip (--gradient-clip-val) the gradients
        # of a fused optimizer under mixed precision, so a run that clips runs Adam unfused.
        fused = self.device.type != "xla" and not self.trainer.gradient_clip_val
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate, fused=fused)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per machine, so that processes never download
        # into the same folder at once; setup() below runs on every process. Trainer.predict
        # calls it too, but predicts the pictures it is given: it needs no MNIST.
        if not self.trainer.predicting:
            download_mnist(self.hparams.data_dir)

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            self.mnist_train, self.mnist_val = load_mnist_train_and_val(self.hparams.data_dir)
        # The test files are read before training too: wrong ones stop the run before it trains.
        if stage in ("fit", "test"):
            self.mnist_test = load_mnist(self.hparams.data_dir, train=False)

    def train_dataloader(self) -> DataLoader:
        return mnist_loader(self.mnist_train, self.hparams.batch_size, self.hparams.num_workers, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # Validation and test never shuffle: Lightning warns if they do, as the video shows.
        return mnist_loader(self.mnist_val, self.hparams.batch_size, self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return mnist_loader(self.mnist_test, self.hparams.batch_size, self.hparams.num_workers)


## The video's `__main__` part, as a function a notebook can call


class Result(NamedTuple):
    """What train_and_test returns. Without logs (fast_dev_run) there is no checkpoint and no run folder."""

    test_acc: float  # on the 10,000 test images, of the checkpoint that validated best
    best_checkpoint: str | None  # its path, for LitNeuralNet.load_from_checkpoint
    run_folder: str | None  # lightning_logs/version_N, for tensorboard --logdir


def train_and_test(args: argparse.Namespace | None = None, run: dict | None = None, **flags) -> Result:
    """Train, validate and test once, as `python lightning_mnist.py` does:
    train_and_test(max_epochs=2, fast_dev_run=False, gpus=None). The keywords are the command
    line's flags, dashes as underscores (lr for --lr), and are checked as the command line is."""
    args = args or parse_args(flags_to_argv(flags))
    run = {} if run is None else run  # where main() follows the run, to say where a signal stopped it
    pl.seed_everything(args.seed, workers=True)
    # The video: model = LitNeuralNet(input_size, hidden_size, num_classes)
    model = LitNeuralNet(**model_arguments(args))
    # The video: trainer = Trainer(fast_dev_run=False, max_epochs=num_epochs, gpus=1), and the
    # rest of the Trainer's options it shows; build_trainer turns each flag into its 2.x name.
    trainer = run["trainer"] = build_trainer(args)
    run_folder = trainer.logger.log_dir if trainer.logger else None  # the learning-rate finder swaps the logger
    run["folder"] = run_folder and Path(run_folder)
    if args.lr_find:
        run["phase"] = "the learning-rate finder"
        find_learning_rate(trainer, model)  # the video's Trainer(auto_lr_find=True)
    run["phase"] = "training"
    trainer.fit(model, ckpt_path=args.ckpt_path)  # the video's trainer.fit(model)
    run["phase"] = "after training"
    if signum := noted_signal(trainer):  # in the last validation, with no training step after it to stop at
        raise Stopped(signum)
    # Beyond the video: one test, on images no epoch has seen, with the weights that validated best.
    run["phase"] = "the final test"
    best_checkpoint = checkpoint_to_test(trainer, args)
    test_acc = trainer.test(model, ckpt_path=best_checkpoint)[0]["test_acc"]
    if rank_zero_only.rank == 0:
        report_results(trainer, model, args, test_acc, best_checkpoint)
    return Result(test_acc, best_checkpoint, run_folder)


def flags_to_argv(flags: dict) -> list[str]:
    """Keyword arguments as a command line: max_epochs=1 is --max-epochs 1, True a bare flag, False or None none."""
    names = {"lr" if name == "learning_rate" else name for name in vars(parse_args([]))} - {"predict"}
    unknown = sorted(flags.keys() - names)
    if unknown:  # argparse would take a prefix (max_ep for --max-epochs) or say "unrecognized" with no hint
        raise TypeError(f"train_and_test() got unknown flags {unknown}; it takes {sorted(names)}")
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


## MNIST, held in memory as tensors

MNIST_MEAN = 0.1307  # mean pixel value of the MNIST training images, scaled to [0, 1]
MNIST_STD = 0.3081  # and their standard deviation
VAL_FRACTION = 1 / 12  # 5,000 of the 60,000 training images are held out for validation
SPLIT_SEED = 42  # fixed, so every run validates on the same 5,000 images


class RunError(Exception):
    """A mistake in the input or a fault of the environment, not a bug of this script: main()
    prints its message, which says what to do, on one line and without a traceback."""


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
REPLACE_MNIST_FILE = "Replace it with an intact copy, or delete it to download MNIST again."
NOT_A_FILE = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


def open_regular(path: str | Path, advice: str) -> BinaryIO:
    """A file opened for reading, or a RunError when path is not a regular file (a FIFO, a device,
    a socket, a folder), whose reading could wait forever or never end; advice says what to do."""
    # Checked before it is opened, since opening a FIFO waits for a writer and opening a socket
    # fails, and again once open (O_NONBLOCK changes nothing for a regular file), in case the
    # path was swapped in between. A missing file is an OSError, which names it.
    kind = stat.S_IFMT(os.stat(path).st_mode)
    if kind == stat.S_IFREG:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        kind = stat.S_IFMT(os.fstat(descriptor).st_mode)
        if kind == stat.S_IFREG:
            return os.fdopen(descriptor, "rb")
        os.close(descriptor)
    raise RunError(f"{shown(path)} is {NOT_A_FILE.get(kind, 'not a regular file')}, not a file. {advice}")


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
    with open_regular(archive, REPLACE_MNIST_FILE) as file:
        packed = file.read()
    try:
        unpacked = gzip.decompress(packed)
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
    with open_regular(path, REPLACE_MNIST_FILE) as file:
        content = bytearray(file.read())  # writable, as torch.frombuffer wants it
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
    if (labels >= NUM_CLASSES).any():
        raise RunError(f"{shown(labels_file)} holds labels up to {labels.max()}; MNIST labels are 0-{NUM_CLASSES - 1}.")
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


## Your own digits: prepared the way MNIST was

# MNIST's digits began as black-and-white scans. Each was scaled to fit a 20x20 box, its aspect
# ratio kept (the grey edges come from the anti-aliasing of that scaling), and placed in a 28x28
# image so that its centre of mass lies at the centre. The model has seen nothing else: a digit
# drawn dark on white paper, large or off-centre, is misread unless it is prepared the same way.
MNIST_SIDE = 28  # pixels a side of an MNIST image
DIGIT_BOX = 20  # pixels a side of the box that a digit's longer side is scaled to
MNIST_CENTRE = 14  # row and column, counted from 0, of MNIST's centres of mass (13.99, 14.01 on average)
MIN_CONTRAST = 0.1  # ink fainter than this against its background (on a 0-1 scale) is no digit
INK_THRESHOLD = 0.2  # what is fainter than this share of the darkest stroke is paper: texture, shadow, JPEG noise
LARGEST_SIDE = 1024  # pixels; a larger picture is first shrunk to this, 50 times the box, to save time and memory
BACKGROUND_SIDE = 32  # pixels a side of the shrunk copy on which the paper's brightness is estimated
FINE = 4  # strokes are redrawn in a frame 4 times finer than the box: 80x80
# MNIST's pen, measured with stroke_width below on the first 5,000 training digits, each cropped, scaled
# to the fine frame and cut at half white: quartiles 1.67 and 2.30 pixels of the box, median 1.96.
PEN_WIDTHS = (1.67, 2.30)  # pixels in the 20x20 box: a pen outside this range is brought to its nearer end
# On the 10,000 MNIST test digits, the default run's answers below 70% are right 59% of the time, those
# above 98.8%; and 0.35% of the digits (7 of the first 2,000) hold two groups of ink of 10% each or more.
UNSURE_BELOW = 0.7  # a top probability below this marks the answer as unsure
GROUP_SHARE = 0.1  # a group of ink counts when it holds this share of the digit's ink; less is a speck


class PictureError(Exception):
    """A picture that cannot be read as a digit; the message says why."""


def open_picture(path: str | Path) -> Image.Image:
    """The picture in a file, in any format Pillow reads, or a PictureError that says what is wrong."""
    try:
        # Pillow warns about pictures over 89 megapixels, which could be made to exhaust memory, and
        # refuses those over twice as many. These are the user's own pictures: only the refusal is shown.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                picture.load()  # Pillow reads lazily: a damaged file fails here, not later
                return picture
    except FileNotFoundError:
        raise PictureError("no such file") from None
    except IsADirectoryError:
        raise PictureError("a folder, not a picture") from None
    except PermissionError:
        raise PictureError("not allowed to read it") from None
    except UnidentifiedImageError:
        raise PictureError("not a picture, or in a format Pillow cannot read") from None
    except Image.DecompressionBombError as error:
        raise PictureError(f"too large to read safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, OSError) and error.errno:  # the system's: a name too long, a disk that fails, ...
            raise PictureError(f"cannot be read ({error.strerror})") from None
        # What Pillow raises for a damaged or truncated file, in its own words.
        raise PictureError(f"the picture is damaged or cut short ({error})") from None


def grey_and_alpha(picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """The picture's brightness and opacity, each 0-1 and no larger than LARGEST_SIDE, from any Pillow mode."""
    if picture.mode == "LAB":
        picture = picture.getchannel("L")  # CIELab's lightness is grey; Pillow converts LAB to nothing else
    elif picture.mode == "F" or picture.mode.startswith("I"):
        # Numbers rather than bytes: the mode and the data say which range is white. Floats hold 0-1 or
        # 0-255; 16-bit integers 0-65535; 32-bit integers 0-255 or 0-65535, whichever the data fit.
        values = pil_to_tensor(picture.convert("F"))
        if not values.isfinite().all():
            raise PictureError("its pixels are not all numbers (NaN or infinity)")
        if picture.mode == "F":
            white = 1.0 if values.max() <= 1 else 255.0
        else:
            white = 255.0 if picture.mode == "I" and values.max() <= 255 else 65535.0
        picture = to_pil_image((values / white).clamp(0, 1).mul(255).round().to(torch.uint8))
    picture = picture.convert("LA")  # grey and alpha, from any other of Pillow's modes
    picture.thumbnail((LARGEST_SIDE, LARGEST_SIDE))
    grey, alpha = (pil_to_tensor(channel)[0] / 255 for channel in picture.split())
    return grey, alpha


def square_max(pixels: torch.Tensor, window: int, inside: bool = False) -> torch.Tensor:
    """The largest value in each window x window square of pixels (N, 1, H, W): along rows, then columns.
    With inside=True, of a square centred on each pixel, of the pixels within the picture."""
    half = window // 2 if inside else 0
    return F.max_pool2d(F.max_pool2d(pixels, (1, window), 1, (0, half)), (window, 1), 1, (half, 0))


def paper_brightness(grey: torch.Tensor) -> torch.Tensor:
    """The paper's brightness under each pixel of a picture of dark ink on lighter paper, however unevenly lit.

    A closing (the lightest pixel around, then the darkest of those) fills in every dark stroke narrower
    than its window and keeps slow changes of light, a slope or a vignette, as they are. It runs on a
    copy shrunk to BACKGROUND_SIDE, for speed and to average out the paper's grain."""
    height, width = grey.shape
    scale = min(1.0, BACKGROUND_SIDE / max(height, width))
    small = F.interpolate(grey[None, None], size=[max(1, round(height * scale)), max(1, round(width * scale))],
                          mode="area")  # fmt: skip
    window = max(small.shape) // 2 * 2 + 1  # half the picture: wider than any stroke of a digit that fits in it
    # The picture is padded by the pixels of its edge, so that the paper's slope reaches to the edge
    # unchanged. Where a stroke runs along a whole side (a digit cropped tightly), that would pad with
    # ink, and the stroke would pass for shadow. So the edge's ink is first painted over with the
    # paper that a closing of the picture alone finds there, reaching 6 of 32 pixels in: past a
    # stroke as wide as a sixth of the picture, nearly twice MNIST's pen. Unable to see past the
    # edge, that closing also lightens the darker side of a page in uneven light, by up to 0.18 in
    # the dark corner of a vignette: ink is what lies deeper below it than twice MIN_CONTRAST, and
    # than half the deepest ink.
    near = max(small.shape) // 5 * 2 + 1
    inside = -square_max(-square_max(small, near, inside=True), near, inside=True)
    below = inside - small
    edge = torch.ones_like(small, dtype=torch.bool)
    edge[..., 1:-1, 1:-1] = False
    small = torch.where(edge & (below > max(below.max() / 2, 2 * MIN_CONTRAST)), inside, small)
    lightest = square_max(F.pad(small, [window - 1] * 4, mode="replicate"), window)
    paper = -square_max(-lightest, window)
    return F.interpolate(paper, size=[height, width], mode="bilinear")[0, 0]


def stroke_width(mask: torch.Tensor) -> torch.Tensor:
    """The mean width of the strokes of a mask (1, 1, H, W) of 0 and 1, in its pixels: its area over half
    its outline, since a stroke of length L has an outline of about 2L."""
    padded = F.pad(mask, [1] * 4)
    outline = (padded[..., 1:, :] != padded[..., :-1, :]).sum() + (padded[..., 1:] != padded[..., :-1]).sum()
    return 2 * mask.sum() / outline.clamp(min=1)


def grown(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """A mask (1, 1, H, W) of 0 and 1 grown by a pixel a side each step, or shrunk where steps < 0. Steps
    alternate between a square and a cross, so that a dot grows into an octagon, near a circle."""
    sign = 1 if steps > 0 else -1  # shrinking the ink is growing the paper
    pixels = sign * mask
    for step in range(abs(steps)):
        if step % 2 == 0:
            pixels = F.max_pool2d(pixels, 3, stride=1, padding=1)
        else:
            pixels = torch.maximum(F.max_pool2d(pixels, (1, 3), stride=1, padding=(0, 1)),
                                   F.max_pool2d(pixels, (3, 1), stride=1, padding=(1, 0)))  # fmt: skip
    return sign * pixels


def even_strokes(ink: torch.Tensor) -> torch.Tensor:
    """A cropped digit's ink as if written with MNIST's pen, scaled to fit the 20x20 box.

    In a frame FINE times finer than the box, the strokes are cut at half the strongest and made
    thinner or thicker until their width lies within MNIST's usual range; shrinking that to the box
    gives MNIST's full white cores and grey, anti-aliased edges."""
    scale = FINE * DIGIT_BOX / max(ink.shape)
    ink = ink[None, None]
    if scale < 0.5:  # a fine pen on a large picture: keep what any pixel of each block holds, not its average
        block = math.floor(1 / scale)
        ink, scale = F.max_pool2d(ink, block, ceil_mode=True), scale * block
    size = [max(1, round(side * scale)) for side in ink.shape[2:]]
    ink = F.interpolate(ink, size=size, mode="bilinear", antialias=True)
    mask = (ink >= ink.max() / 2).float()
    # A pen of radius r more on each side makes strokes of width w and a digit of length L into w + 2r
    # and L + 2r; scaled to the box, the width is (w + 2r) * DIGIT_BOX / (L + 2r). Solved for r:
    width, length = stroke_width(mask), max(size)
    target = (width * DIGIT_BOX / length).clamp(PEN_WIDTHS[0], PEN_WIDTHS[1])
    radius = ((target * length / DIGIT_BOX - width) / (2 * (1 - target / DIGIT_BOX))).item()
    steps = round(radius)
    if steps:
        drawn = grown(F.pad(mask, [abs(steps)] * 4), steps)
        rows, columns = drawn[0, 0].any(dim=1).nonzero(), drawn[0, 0].any(dim=0).nonzero()
        if len(rows):  # else thinning rubbed out every stroke (a blot, not strokes): keep them as they are
            mask = drawn[..., rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    height, width = mask.shape[2:]
    scale = DIGIT_BOX / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return F.interpolate(mask, size=size, mode="area")[0, 0]


def prepare_digit(picture: str | Path | Image.Image) -> torch.Tensor:
    """A picture of one digit (a file or a Pillow image) as MNIST's images are: (1, 28, 28), normalised.

    Raises PictureError, with the reason, for a file that is missing or no picture, and for a picture
    that holds nothing but background."""
    if not isinstance(picture, Image.Image):
        picture = open_picture(picture)
    picture = ImageOps.exif_transpose(picture)  # photos taken sideways, as their camera says
    grey, alpha = grey_and_alpha(picture)
    if (alpha < 1).any():
        # Transparent pixels are background, as in drawing programs' exports: lay the strokes on
        # paper of the opposite shade, white behind dark strokes and black behind light ones.
        strokes = (grey * alpha).sum() / alpha.sum().clamp(min=1)  # their mean shade; 0 if there are none
        paper = 1.0 if strokes < 0.5 else 0.0
        grey = grey * alpha + paper * (1 - alpha)
    # The shade of most of the picture's edge is the paper's. When it is the darker one (light strokes
    # on a dark ground, as in MNIST), invert: from here on, the paper is the lighter.
    edge = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).median()
    if edge <= (grey.min() + grey.max()) / 2:
        grey = 1 - grey
    paper = paper_brightness(grey)
    if (paper - grey).max() < MIN_CONTRAST:
        raise PictureError("nothing but background: no digit found")
    # Ink is the share of the light that the paper would reflect which the pen took away: the same
    # on the brightly and the dimly lit side of a page.
    ink = ((paper - grey) / paper.clamp(min=MIN_CONTRAST)).clamp(0, 1)
    ink[ink < INK_THRESHOLD * ink.max()] = 0
    rows, columns = ink.any(dim=1).nonzero(), ink.any(dim=0).nonzero()
    ink = even_strokes(ink[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1])
    # Place it in 28x28 so that its centre of mass falls on MNIST's (negative padding crops).
    height, width = ink.shape
    row = (ink.sum(dim=1) * torch.arange(height)).sum() / ink.sum()
    column = (ink.sum(dim=0) * torch.arange(width)).sum() / ink.sum()
    top, left = round(MNIST_CENTRE - row.item()), round(MNIST_CENTRE - column.item())
    image = F.pad(ink, (left, MNIST_SIDE - left - width, top, MNIST_SIDE - top - height))
    return ((image - MNIST_MEAN) / MNIST_STD).unsqueeze(0)


def ink_groups(image: torch.Tensor) -> int:
    """How many separate groups of ink a prepared digit (1, 28, 28) holds, each at least GROUP_SHARE of it."""
    ink = image[0] * MNIST_STD + MNIST_MEAN  # back to 0-1
    inked = ink > MIN_CONTRAST
    # Each inked pixel takes the largest number among its 8 neighbours until nothing changes: then each
    # group of touching pixels holds one number.
    labels = torch.arange(1, inked.numel() + 1, dtype=torch.float).reshape(inked.shape) * inked
    while True:
        spread = F.max_pool2d(labels[None], 3, stride=1, padding=1)[0] * inked
        if torch.equal(spread, labels):
            break
        labels = spread
    shares = [ink[labels == label].sum() / ink.sum() for label in labels.unique() if label > 0]
    return sum(share >= GROUP_SHARE for share in shares)


def doubts(probabilities: torch.Tensor, image: torch.Tensor) -> list[str]:
    """Why the model's answer for a prepared digit may be wrong: nothing when there is no reason to doubt it."""
    reasons = []
    if probabilities.max() < UNSURE_BELOW:
        reasons.append(f"top answer under {UNSURE_BELOW:.0%}")
    groups = ink_groups(image)
    if groups > 1:
        reasons.append(f"ink in {groups} separate groups")
    return reasons


## Pictures in TensorBoard

# TensorBoard shows each picture in a card about 330 pixels wide, shrinking what is wider
# (unless "Show actual image size" is ticked): the pictures are drawn for that width.
CARD_WIDTH = 330
GRID_IMAGES = 32  # validation images shown with the model's guess, the same ones every epoch
GRID_COLUMNS = 4  # so 8 rows of 4, each image 3 times MNIST's size: 356 pixels across, barely shrunk
GRID_SCALE = 3
GRID_PADDING = 4  # white pixels between the images
FONT_SIZE = 16  # pixels; text in the pictures, about 15 on screen in the card


class ValidationPictures(pl.Callback):
    """TensorBoard's Images tab, once per validation epoch: the model's guesses on the first
    validation images, and its confusion matrix over all of them."""

    def __init__(self) -> None:
        self.confusion = MulticlassConfusionMatrix(NUM_CLASSES, validate_args=False)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.confusion.to(pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        images, labels = batch
        self.confusion.update(outputs, labels)  # outputs: the logits that validation_step returns
        if batch_idx == 0:
            # The validation loader never shuffles: these are the same images every epoch, and
            # TensorBoard's slider shows the guesses for them change as the model learns.
            self.shown = images[:GRID_IMAGES], outputs[:GRID_IMAGES].argmax(dim=1), labels[:GRID_IMAGES]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = self.confusion.compute()  # every process takes part: it adds up their counts
        self.confusion.reset()
        # One process draws, and not for the few batches of the sanity check before training.
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger):
            return
        tensorboard = trainer.logger.experiment  # torch's SummaryWriter
        tensorboard.add_image("val_predictions", predictions_grid(*self.shown), trainer.current_epoch)
        tensorboard.add_image("val_confusion_matrix", confusion_picture(counts), trainer.current_epoch)


def predictions_grid(images: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised images in a grid, each framed and labelled with the model's guess: green if right,
    red and followed by the true digit if wrong ("7, is 1")."""
    pixels = (images.float().cpu() * MNIST_STD + MNIST_MEAN).clamp(0, 1)  # undo the normalisation
    pixels = F.interpolate(pixels, scale_factor=GRID_SCALE)  # room for a caption in a corner
    size = pixels.shape[-1]
    grid = to_pil_image(make_grid(pixels, nrow=GRID_COLUMNS, padding=GRID_PADDING, pad_value=1))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    for index, (predicted, true) in enumerate(zip(predictions.tolist(), labels.tolist(), strict=True)):
        row, column = divmod(index, GRID_COLUMNS)
        left, top = GRID_PADDING + column * (size + GRID_PADDING), GRID_PADDING + row * (size + GRID_PADDING)
        colour = "green" if predicted == true else "red"
        caption = str(predicted) if predicted == true else f"{predicted}, is {true}"
        draw.rectangle((left, top, left + size - 1, top + size - 1), outline=colour, width=2)
        text_right, text_bottom = draw.textbbox((left + 3, top + 1), caption, font=font)[2:]
        draw.rectangle((left, top, text_right + 3, text_bottom + 3), fill=colour)
        draw.text((left + 3, top + 1), caption, fill="white", font=font)
    return pil_to_tensor(grid)


CELL = 40  # pixels a side of a confusion-matrix cell, room for a count of 5,000
BLUE, RED = (8, 48, 107), (165, 15, 21)  # the colours of a full cell: right guesses, mistakes
EMPTY = 245  # the light grey of an empty cell


def confusion_picture(counts: torch.Tensor) -> torch.Tensor:
    """The confusion matrix, true digits down and guesses across, each cell with its count and
    tinted by its share of the true digit's images: blue when right, red for the mistakes."""
    # Drawn with Pillow: matplotlib took longer than a tenth of an epoch for this picture.
    font = ImageFont.load_default(size=14)
    side = CELL * (NUM_CLASSES + 1)
    picture = Image.new("RGB", (side, side + CELL // 2), "white")
    draw = ImageDraw.Draw(picture)
    caption = "rows: the true digit, columns: the model's guess"
    draw.text((side // 2, side + CELL // 4), caption, fill="black", font=font, anchor="mm")
    shares = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
    for true, row in enumerate(counts.tolist()):
        centre = CELL * (true + 1) + CELL // 2
        draw.text((centre, CELL // 2), str(true), fill="black", font=font, anchor="mm")  # the guesses, across
        draw.text((CELL // 2, centre), str(true), fill="black", font=font, anchor="mm")  # the true digits, down
        for guess, count in enumerate(row):
            # The square root makes a mistake of 1% of a digit's images visible: a tenth of the full colour.
            strength = shares[true][guess] ** 0.5
            full = BLUE if guess == true else RED
            fill = tuple(round(EMPTY + strength * (channel - EMPTY)) for channel in full)
            left, top = CELL * (guess + 1), CELL * (true + 1)
            draw.rectangle((left, top, left + CELL - 2, top + CELL - 2), fill=fill)
            if count:
                text = "white" if strength > 0.6 else "black"
                draw.text((left + CELL // 2, top + CELL // 2), str(count), fill=text, font=font, anchor="mm")
    return pil_to_tensor(picture)


def lr_find_picture(rates: list[float], losses: list[float], suggestion: float | None) -> torch.Tensor:
    """The learning-rate finder's loss against the learning rate, on a log scale, with its
    suggestion as a red dot (what Lightning's lr_finder.plot draws, without matplotlib)."""
    width, height, left_margin, bottom_margin, top_margin = CARD_WIDTH, 250, 52, 44, 24
    points = [(math.log10(rate), loss) for rate, loss in zip(rates, losses, strict=True) if math.isfinite(loss)]
    (first, last), (low, high) = ((min(axis), max(axis)) for axis in zip(*points, strict=True))
    ticks = loss_ticks(low, high)
    low, high = ticks[0], ticks[-1]  # the axis runs from tick to tick

    def at(x: float, y: float) -> tuple[float, float]:
        across = (x - first) / ((last - first) or 1)
        up = (y - low) / (high - low)
        return left_margin + across * (width - left_margin - 12), height - bottom_margin - up * (
            height - bottom_margin - top_margin
        )

    font = ImageFont.load_default(size=FONT_SIZE - 2)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.line([at(first, high), at(first, low), at(last, low)], fill="black")  # the axes
    powers = range(math.ceil(first), math.floor(last) + 1)  # 1e-05, 1e-04, ...
    stride = math.ceil(len(powers) * 40 / (width - left_margin))  # a label needs about 40 pixels
    for power in powers[::stride]:
        x, y = at(power, low)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x, y + 6), f"1e{power}", fill="black", font=font, anchor="mt")
    for loss in ticks:
        x, y = at(first, loss)
        draw.line([(x - 4, y), (x, y)], fill="black")
        draw.text((x - 6, y), f"{loss:.{tick_decimals(ticks)}f}", fill="black", font=font, anchor="rm")
    draw.text((width / 2, height - 10), "learning rate", fill="black", font=font, anchor="ms")
    draw.text((4, 4), "loss", fill="black", font=font, anchor="lt")
    draw.line([at(x, y) for x, y in points], fill=BLUE, width=2)
    if suggestion is not None:
        x, y = at(*min(points, key=lambda point: abs(point[0] - math.log10(suggestion))))
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill="red")
    return pil_to_tensor(picture)


def loss_ticks(low: float, high: float) -> list[float]:
    """Round values for the loss axis, 1, 2 or 5 times a power of ten apart, from at or below
    low to at or above high: 3 to 7 of them, so the axis reads at a glance."""
    if high - low <= 1e-9 * max(abs(low), abs(high), 1e-9):  # flat, to float precision: an axis around it
        margin = 0.05 * abs(low) or 0.5
        low, high = low - margin, high + margin
    spread = high - low
    power = 10 ** math.floor(math.log10(spread / 5))
    step = next(power * multiple for multiple in (1, 2, 5, 10) if spread / (power * multiple) <= 5)
    start, end = math.floor(low / step), math.ceil(high / step)
    return [index * step for index in range(start, max(end, start + 1) + 1)]


def tick_decimals(ticks: list[float]) -> int:
    """Decimals enough to tell the ticks apart: 0.05 apart, two."""
    return max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))


## Runs: a folder of their own, checkpoints that survive a crash, the Trainer

LOG_EVERY_N_STEPS = 10  # train_loss to TensorBoard and the progress bar: 110 points in a default run

# Keep the output to what a user can act on. Lightning 2.6 advertises its cloud logger at
# every start; its own code trips a deprecation warning of newer torch; it warns that a
# checkpoints folder is not empty, which a continued run's is on purpose (a new run's never
# is: claim_run_folder); and on machines with more than 2 cores it suggests DataLoader
# workers, which would slow this script down (see mnist_loader). For data that needs
# decoding, that tip is right: delete its filter then.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)


def filter_warnings() -> None:
    """Put this script's warnings filters in front of all others (PYTHONWARNINGS=error, say)."""
    # Called by main(), not at import: filters set then would be lost when a notebook or a test
    # imports this module inside warnings.catch_warnings(), and come behind any set later.
    # Lightning's advice about a run's settings (fewer batches than the logging interval, a run
    # resumed in the middle of an epoch) is shown, and never made an error by PYTHONWARNINGS=error:
    # a run is not stopped for advice. Any other warning made an error ends in one `error:` line.
    warnings.filterwarnings("default", category=PossibleUserWarning)
    # Each filter goes in front of those before it: the ones below win over the line above.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")


filter_warnings()  # also for the processes of --strategy ddp_spawn, which import this module and never run main()


class Diverged(RunError):
    """The weights, or the validation loss, became NaN or infinite: nothing trained with them is
    saved, tested or reported."""

    def __init__(self, what: str, step: int, learning_rate: float) -> None:
        super().__init__(
            f"{what} by step {step}: the model diverged, and its accuracy would mean nothing. No checkpoint "
            f"holds these weights. Try a smaller --lr than {learning_rate:g}."
        )


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Whether every number in these tensors is finite, as a tensor on their device: reading it
    makes a GPU wait, computing it does not."""
    # A sum is NaN or infinite when any of its numbers is, and is 30 times quicker to take than
    # isfinite() of every number. A sum of finite numbers that overflows needs weights of 1e33
    # or more: a model diverged all the same.
    return torch.stack([tensor.sum() for tensor in tensors if tensor.is_floating_point()]).isfinite().all()


def refuse_diverged(path: str | Path, state_dict: dict) -> None:
    """A RunError if the checkpoint at path holds a weight that is NaN or infinite."""
    if not all_finite(state_dict.values()):
        raise RunError(
            f"{shown(path)} holds weights that are NaN or infinite: its run diverged, and nothing it predicts or "
            "scores means anything. Use an earlier checkpoint, or train again with a smaller --lr."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made safe: a checkpoint file is always whole, old or new, and
    never holds weights that are NaN or infinite."""

    # Lightning writes over the old file in place, so a crash, a kill or a full disk in the
    # middle of a save leaves a truncated checkpoint where a good one was. This one writes a
    # temporary file beside it, forces it onto the disk, and renames it over the old file.
    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
        # Every checkpoint passes here, so here a diverged model is kept off the disk, whatever
        # check of StopWhenDiverged it slipped past. When Lightning saves last.ckpt because an
        # exception is stopping the run (save_on_exception), that exception is what the run
        # reports: raising another would cut Lightning's clean-up short. The checkpoint before
        # stays, and it stays too when the exception is StopWhenDiverged's own.
        stopping = sys.exc_info()[1]
        if isinstance(stopping, Diverged):
            return
        weights = checkpoint.get("state_dict", checkpoint)  # --strategy ddp_spawn passes back bare weights
        if not all_finite(weights.values()):
            if stopping is not None:
                return
            raise RunError(
                f"the weights became NaN or infinite: the model diverged, and {path} was not written; the "
                "checkpoints before stay. Try a smaller --lr."
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                writer = OSErrorKeeper(file)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError as error:  # torch's own words for a failed write, which lose the OS's reason
                    if writer.error is None:
                        raise
                    raise writer.error from error
                file.flush()
                os.fsync(file.fileno())
            temporary.replace(path)
        except BaseException as error:
            temporary.unlink(missing_ok=True)  # whatever stopped the write, the checkpoint before stays whole
            if not isinstance(error, OSError):
                raise
            # The OS's own reason (a full disk, a file-size limit, a quota, a read-only disk, ...).
            reason = error.strerror or str(error)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                reason += f", with {shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free on its disk"
            raise RunError(
                f"could not write the checkpoint {shown(path)}: {reason}. The checkpoints written before are whole."
            ) from error
        folder = os.open(path.parent, os.O_RDONLY)  # and the rename too, before the next save removes an old file
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class OSErrorKeeper:
    """A file for torch.save that keeps the OSError of a failed write: torch raises a RuntimeError
    of its own instead ("PytorchStreamWriter failed writing file"), without the OS's reason."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


# After its save on an exception, Lightning says "An <exception> was raised with message: ...,
# saved checkpoint to ...", which is untrue when the weights were NaN and the save refused;
# main() says what stopped the run and what the checkpoint holds instead.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "was raised with message" not in record.getMessage()
)


class StopWhenDiverged(pl.Callback):
    """Ends training with an error as soon as the weights are no longer finite numbers, before
    anything validates, saves or tests them."""

    # Every step's weights are checked, on the device: a GPU computes the check with the step
    # and need not wait for it. The answer is read on the steps Lightning logs, which wait for
    # the device anyway, and before every validation and save.
    def on_fit_start(self, trainer, pl_module) -> None:
        self.finite = torch.ones((), dtype=torch.bool, device=pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._check(trainer, pl_module)
        else:
            self.finite &= all_finite(pl_module.parameters())

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # before ModelCheckpoint's save, which comes last
        self._check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # which comes before the first step
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:  # before ModelCheckpoint saves the best epoch
        # Finite weights can still give outputs that overflow: a validation loss of NaN or infinity.
        if trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():  # the validation's, and the last logged train_loss
            if not value.isfinite().all():
                what = f"the model's outputs gave a {name} of {value.item():g}"
                raise Diverged(what, trainer.global_step, pl_module.hparams.learning_rate)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # A checkpoint to continue or to test, saved by an older version of this script, say.
        refuse_diverged(trainer.ckpt_path, checkpoint["state_dict"])

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The weights as they are now: another callback may have changed them since the step.
        # Under DDP every process holds the same weights, so all of them stop at the same step.
        self.finite &= all_finite(pl_module.parameters())
        if not self.finite:
            raise Diverged("the weights became NaN or infinite", trainer.global_step, pl_module.hparams.learning_rate)


# The signals that ask a run to stop: Ctrl-C; SIGTERM, what `kill`, SLURM (scancel, the time
# limit), Kubernetes and systemd send; and SIGHUP, when the terminal or ssh session that
# started the run closes. Each stops the run the same way: see StopOnSignal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(SystemExit):
    """A stop signal, raised where the run can stop; its exit status is 128 + the signal's number,
    what a shell or a scheduler reports for a process a signal stopped."""

    # A SystemExit, which Lightning passes on after saving last.ckpt, and which no `except
    # Exception` on the way mistakes for an error.
    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(128 + self.signal)


def stop_at_once(signum: int, frame: object) -> None:
    """The stop signals' handler outside Lightning's loops: stop where the run is."""
    raise Stopped(signum)


def worker_ignores_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's first step: leave the stop signals to the main process."""
    # Ctrl-C in a terminal and a scheduler's signal to the process group reach the workers too.
    # A worker that died of one would fail the main process's next batch, before it saved.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # What Lightning sets as worker_init_fn when a loader has none: it seeds each worker.
    pl_worker_init_function(worker_id)


class StopOnSignal(pl.Callback):
    """A stop signal in Lightning's loops stops every process after the same training step, and
    Lightning saves that step in last.ckpt. A second signal stops at once."""

    # Lightning 2.6 handles SIGTERM itself, but under DDP its handler talks to the other
    # processes from inside the signal handler, which can deadlock them (Lightning issue
    # #20806); and Ctrl-C stops each process wherever it is. So while Lightning runs, this
    # handler only notes the signal, and the processes agree on it at the end of a step.
    # Lightning puts back main()'s handler, stop_at_once, when it is done.
    def __init__(self) -> None:
        self.signal = None

    def on_sanity_check_start(self, trainer, pl_module) -> None:  # Lightning has installed its handlers by now
        self._listen()

    def on_train_start(self, trainer, pl_module) -> None:
        self._listen()

    def on_test_start(self, trainer, pl_module) -> None:  # the test, under a second, runs to its end
        self._listen()

    def _listen(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            raise Stopped(self.signal)
        self.signal = signal.Signals(signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self.signal or 0
        if trainer.world_size > 1:  # the processes agree, at a message between them: every 10 steps
            if trainer.global_step % trainer.log_every_n_steps:
                return
            # Each process may have had another signal, or none yet: all stop with the highest.
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        if signum:
            raise Stopped(signum)  # Lightning saves last.ckpt, then passes it on to main()


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar, whose v_num names a continued run's folder in full."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        # A run continued in its folder keeps the name that folder has (run_logger), which
        # Lightning would cut to its last 4 characters: v_num=on_3 for version_3.
        if trainer.logger and isinstance(trainer.logger.version, str):
            metrics["v_num"] = trainer.logger.version
        return metrics


class NotebookProgressBar(RunProgressBar):
    """Lightning's progress bar without the validation bar it draws under the training bar. A
    Jupyter notebook ignores the cursor movements that keep one bar under another, so each
    validation would leave its lines piled up; the training bar still shows val_loss and val_acc."""

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)


@rank_zero_only
def claim_run_folder(save_dir: Path) -> int:
    """The number N of a new save_dir/lightning_logs/version_N folder, made by this call."""
    # TensorBoardLogger takes the highest version_N it finds plus one, so two runs started at
    # once in one folder can take the same one and overwrite each other's checkpoints. A mkdir
    # either creates the folder or fails, atomically: the run whose mkdir succeeds owns it.
    # Only global rank 0 claims one (other DDP processes get None); they write nothing.
    logs = save_dir / "lightning_logs"
    if logs.is_symlink() and not logs.exists():
        raise RunError(f"{logs} links to {os.readlink(logs)}, which does not exist: mount it, or remove the link.")
    if logs.exists() and not logs.is_dir():
        raise RunError(f"{logs} is a file, where this script keeps its runs: move it away.")
    logs.mkdir(exist_ok=True)
    # The search starts after the highest plain number in use, so that runs sort in the order
    # they were made; other names (version_00, a copy's "version_1 (copy)") are left alone.
    numbers = [int(path.name[8:]) for path in logs.glob("version_*") if re.fullmatch(r"[0-9]+", path.name[8:])]
    version = max(numbers, default=-1) + 1
    while True:
        try:
            (logs / f"version_{version}").mkdir()
            return version  # a number, which Lightning's progress bar shows whole as v_num
        except FileExistsError:  # another run took it between the search and now
            version += 1


def run_logger(checkpoint: str | None) -> TensorBoardLogger:
    """The run's TensorBoard logger, which also decides where its checkpoints go: the folder of
    the run that the checkpoint continues, under the name it has now, or a new lightning_logs/version_N."""
    # A run continued from one of its own checkpoints stays in its folder, whatever that folder
    # is called or wherever it has moved: its curves go on, and RunCheckpoint finds its best.
    folder = Path(checkpoint).resolve().parent.parent if checkpoint else None
    if folder and (folder / "hparams.yaml").is_file():
        return TensorBoardLogger(folder.parent.parent, folder.parent.name, folder.name, default_hp_metric=False)
    # The HParams tab gets the accuracies that main() logs, instead of a placeholder "hp_metric".
    return TensorBoardLogger(Path.cwd(), version=claim_run_folder(Path.cwd()), default_hp_metric=False)


def stored_score(path: Path) -> tuple[float, int] | None:
    """The val_acc a checkpoint's weights were validated at and its training step, as the checkpoint
    itself stores them; None for a file that holds no validated checkpoint of this script."""
    try:
        # mmap: only the few values read here come from the disk, not the weights.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):  # damaged, or no checkpoint
        return None
    states = checkpoint.get("callbacks", {}).values() if isinstance(checkpoint, dict) else []
    for state in states:  # the best epoch's RunCheckpoint, known by what it holds
        if isinstance(state, dict) and state.get("monitor") == "val_acc" and state.get("current_score") is not None:
            return float(state["current_score"]), int(checkpoint.get("global_step", 0))
    return None


def best_stored_checkpoint(folder: Path, score: float | None = None) -> Path | None:
    """The checkpoint in folder that validated best (or at score), by what the checkpoints store.

    Of equal scores, the one saved first: the epoch that reached it, where a last.ckpt saved later
    in that epoch, after a Ctrl-C, holds the same score but weights trained further."""
    scored = [(found, path) for path in sorted(folder.glob("*.ckpt")) if (found := stored_score(path))]
    if score is not None:
        scored = [(found, path) for found, path in scored if found[0] == score]
    if not scored:
        return None
    return min(scored, key=lambda entry: (-entry[0][0], entry[0][1]))[1]


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose state a continued run restores even when the run's
    folder has moved since the checkpoint was saved."""

    # Lightning restores the best score only when the checkpoints folder has the path it had at
    # the save ("The dirpath has changed"): a run renamed, remounted or copied to another machine
    # would save a worse epoch as a second best and test it. The score is in the saved state,
    # and the best file is the one in the folder as it is now that stores that score.
    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key: a checkpoint saved by a plain ModelCheckpoint (this script
        # before RunCheckpoint, or a copy of it) restores its best here, and ours restores there.
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:  # before load_state_dict
        # Checkpoints saved while this class kept its state under its own name restore it too.
        states = checkpoint.get("callbacks", {})
        own_name = type(self).__qualname__ + self.state_key.removeprefix("ModelCheckpoint")
        if own_name in states and self.state_key not in states:
            states[self.state_key] = states[own_name]

    def load_state_dict(self, state_dict: dict) -> None:
        if self.dirpath and state_dict.get("dirpath") != self.dirpath:
            score = state_dict.get("best_model_score")
            best = best_stored_checkpoint(Path(self.dirpath), float(score)) if score is not None else None
            moved = {"dirpath": self.dirpath, "last_model_path": ""}  # paths of the old place mean nothing here
            if best:
                moved |= {"best_model_path": str(best), "best_k_models": {str(best): score},
                          "kth_best_model_path": str(best), "kth_value": score}  # fmt: skip
            else:  # no best file here: the next epoch starts the run's best afresh
                moved |= {"best_model_score": None, "best_model_path": "", "best_k_models": {},
                          "kth_best_model_path": "", "kth_value": self.kth_value}  # fmt: skip
            state_dict = state_dict | moved
        super().load_state_dict(state_dict)


def build_trainer(args: argparse.Namespace) -> pl.Trainer:
    """A Trainer configured by the command line, checkpointing the best epoch by val_acc."""
    # The video's Trainer(gpus=N) is gone in Lightning 2.x: accelerator="gpu", devices=N.
    accelerator, devices = ("gpu", args.gpus) if args.gpus else (args.accelerator, args.devices)
    # The best epoch by val_acc, which the final test uses; the video's Lightning saved the
    # latest epoch instead.
    best = RunCheckpoint(monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.4f}")
    # The latest epoch, to resume from. Lightning 2.6 rewrites save_last=True's last.ckpt only
    # when val_acc improves, so a second checkpoint holds it. When Ctrl-C or SIGTERM stops
    # training, Lightning saves it there and then, in the middle of the epoch.
    last = RunCheckpoint(filename="last", enable_version_counter=False, save_on_exception=True)
    logger = None if args.fast_dev_run else run_logger(args.ckpt_path)  # fast_dev_run logs and saves nothing
    try:
        trainer = lightning_trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=args.strategy,
            num_nodes=args.num_nodes,
            precision=args.precision,
            max_epochs=args.max_epochs,
            fast_dev_run=args.fast_dev_run,
            deterministic=args.deterministic,
            gradient_clip_val=args.gradient_clip_val,
            # The 2.x names of the video's train_percent_check and val_percent_check.
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches,
            # Lightning's default of every 50 steps starts the train_loss curve after the loss has
            # fallen from 2.3 to 0.3; every 10 shows more of that fall.
            log_every_n_steps=LOG_EVERY_N_STEPS,
            callbacks=[
                best,
                last,
                ValidationPictures(),
                StopWhenDiverged(),
                StopOnSignal(),
                # Redrawing the bar at every step of a fast net costs more than the step itself.
                (NotebookProgressBar if "ipykernel" in sys.modules else RunProgressBar)(LOG_EVERY_N_STEPS),
            ],
            logger=logger or False,
            plugins=[AtomicCheckpointIO()],
            # Anything else a run writes (the learning-rate finder's temporary checkpoint) goes in its folder.
            default_root_dir=logger.log_dir if logger else None,
        )
        check_launch(trainer)
    except RunError:
        discard_unused_run_folder(logger and Path(logger.log_dir))
        raise
    if trainer.precision != args.precision:
        # Lightning names the precision in full, and falls back to one the hardware has (a CPU
        # has no 16-mixed): say so, and record what the run used.
        if rank_zero_only.rank == 0:
            print(
                f"Training in precision {trainer.precision}, which Lightning chose for --precision {args.precision}.",
                file=sys.stderr,
            )
        args.precision = trainer.precision
    return trainer


def lightning_trainer(**options) -> pl.Trainer:
    """pl.Trainer(**options), or a RunError with Lightning's reason when it refuses them."""
    try:
        return pl.Trainer(**options)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as error:  # Lightning checks its arguments
        hint = ""
        if options["accelerator"] in ("gpu", "cuda") and not torch.cuda.is_available():
            hint = " This machine has no GPU that torch can use: leave out --gpus/--accelerator to train on the CPU."
        raise RunError(f"the Trainer cannot be set up as asked: {error}{hint}") from error


def check_launch(trainer: pl.Trainer) -> None:
    """Refuse, before it starts, a run that would wait forever or overload the machine."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_nodes > 1 and not (environment and environment.creates_processes_externally):
        raise RunError(
            f"--num-nodes {trainer.num_nodes} needs the script started on each machine by a launcher that tells "
            "it its rank, such as torchrun or SLURM's srun; started alone it would wait for the other machines "
            'forever. See the README\'s section "More devices, more machines".'
        )
    cores = cpu_cores()
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        raise RunError(
            f"--devices {trainer.num_devices} on the CPU starts {trainer.num_devices} training processes, "
            f"but this machine has {cores} CPU cores: use --devices {cores} or fewer."
        )


def discard_unused_run_folder(folder: Path | None) -> None:
    """Remove a run's folder if it holds no checkpoint: a run that stopped before saving one
    leaves nothing behind. Global rank 0 alone does, which alone writes there."""
    if folder is None or rank_zero_only.rank != 0:
        return
    if folder.is_dir() and not list(folder.glob("checkpoints/*.ckpt")):
        shutil.rmtree(folder)


def model_arguments(args: argparse.Namespace) -> dict:
    """LitNeuralNet's arguments. A continued run takes the model's from its checkpoint: a flag
    given that contradicts them is refused, rather than silently replaced."""
    arguments = {"data_dir": args.data_dir, "num_workers": args.num_workers}
    trained = read_checkpoint(args.ckpt_path) if args.ckpt_path else {}
    for name, flag, default in CHECKPOINT_FLAGS:
        given = getattr(args, name)  # None when the flag was left out
        if trained and given is not None and given != trained[name]:
            raise RunError(
                f"{flag} {given} contradicts the checkpoint, whose run used {flag} {trained[name]}: "
                f"leave {flag} out to continue that run, or leave --ckpt-path out to start a new one."
            )
        arguments[name] = trained.get(name, default if given is None else given)
    check_memory(arguments)
    return arguments


# The flags of LitNeuralNet's arguments that a continued run takes from its checkpoint, and
# their defaults for a new run.
CHECKPOINT_FLAGS = [("hidden_size", "--hidden-size", HIDDEN_SIZE), ("learning_rate", "--lr", LEARNING_RATE),
                    ("batch_size", "--batch-size", BATCH_SIZE)]  # fmt: skip


def read_checkpoint(path: str) -> dict:
    """The hyperparameters of a checkpoint of this script, or a RunError that says what the file is instead."""
    advice = "give --ckpt-path a last.ckpt or best checkpoint of a run of this script."
    with open_regular(path, advice.capitalize()) as file:
        start = file.read(4)
    if start != b"PK\x03\x04":  # torch.save writes a zip archive
        raise RunError(f"{shown(path)} {'is empty' if not start else 'is not a PyTorch checkpoint'}: {advice}")
    try:
        # weights_only: a checkpoint holds tensors and plain values; anything else could run code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged archive fails in many ways
        problem = "is cut short or damaged"
        if "Weights only load failed" in str(error):  # torch's refusal of anything but tensors and plain values
            problem = "holds Python objects besides tensors and plain values, as this script's checkpoints never do"
        raise RunError(f"{shown(path)} {problem}: {advice}") from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not {name for name, _, _ in CHECKPOINT_FLAGS} <= hparams.keys():
        raise RunError(
            f"{shown(path)} is not a checkpoint of this script (no LitNeuralNet hyperparameters: weights saved with "
            "torch.save, say): give --ckpt-path a last.ckpt or best checkpoint of a run of this script."
        )
    # Each of LitNeuralNet's arguments, of its default's type; older checkpoints may lack some.
    arguments = inspect.signature(LitNeuralNet).parameters
    unknown = [
        name
        for name, value in hparams.items()
        if name not in arguments or type(value) is not type(arguments[name].default)
    ]
    if unknown:
        raise RunError(
            f"{shown(path)} holds hyperparameters that LitNeuralNet does not take "
            f"({shown(', '.join(map(str, unknown)))}, by name or type): it is damaged, or from another version "
            "of this script."
        )
    try:
        with torch.device("meta"):  # the shapes of the weights these hyperparameters make, with no memory for them
            expected = {name: value.shape for name, value in LitNeuralNet(**hparams).state_dict().items()}
    except RuntimeError as error:  # sizes that make no weights: below 1, say
        raise RunError(f"{shown(path)} holds hyperparameters that make no model: it is damaged.") from error
    found = {name: value.shape for name, value in checkpoint.get("state_dict", {}).items()}
    if found != expected:
        raise RunError(
            f"{shown(path)} holds weights that do not fit its own hyperparameters: it is damaged or not from "
            "this script."
        )
    return hparams


def check_memory(arguments: dict) -> None:
    """Refuse a model too large for this machine's memory: Linux would kill the run with no word."""
    with torch.device("meta"):
        weights = sum(parameter.numel() for parameter in LitNeuralNet(**arguments).parameters())
    need = 16 * weights  # 4 bytes each for a weight, its gradient and Adam's two running averages
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: leave it to the allocator
        return
    if need > memory:
        raise RunError(
            f"a model with --hidden-size {arguments['hidden_size']} has {weights:,} weights and needs about "
            f"{need / 2**30:.1f} GiB to train, more than this machine's {memory / 2**30:.1f} GiB: use a smaller one."
        )


## Command line: every Trainer feature the video shows, as a flag


# Counts (batch size, epochs, devices, ...) are below this: larger ones overflow the sizes of torch
# and Lightning, which would crash with a traceback. A model too large for memory is refused
# sooner, by check_memory.
COUNT_LIMIT = 2**31


def _number(kind: type, minimum: float, above: bool = False, maximum: float = float("inf")):
    """An argparse type for a number of `kind` at least (or above) `minimum`, whose errors say so."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if above else value >= minimum) or not value < maximum:
            what = "an integer" if kind is int else "a number"
            bounds = f"{'above' if above else 'of at least'} {minimum}"
            bounds += f" and below {maximum}" if maximum < float("inf") else ""
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value

    return parse


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _int_or_text(text: str) -> int | str:
    """Lightning's devices: a number, or text such as "auto" or "0,1"."""
    try:
        value = int(text)
    except ValueError:
        return text
    if not -COUNT_LIMIT < value < COUNT_LIMIT:  # Lightning checks the rest
        raise argparse.ArgumentTypeError(f"expected a number of devices below {COUNT_LIMIT}, got {text!r}")
    return value


def _batches(text: str) -> int | float:
    """Lightning's limit_*_batches: a number of batches (an integer) or a fraction of them."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected a number of batches (10) or a fraction of them (0.25), got {text!r}")


PREDICT_FLAGS = {
    "predict",
    "ckpt_path",
    "accelerator",
    "devices",
    "gpus",
    "precision",
    "batch_size",
}  # what --predict uses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; each default is set here once and shown by --help."""
    parser = argparse.ArgumentParser(
        description="Train the tutorial's feed-forward MNIST classifier with PyTorch Lightning, "
        "or read your own pictures of digits with it (--predict).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model and data (LitNeuralNet's arguments)")
    model.add_argument(
        "--hidden-size",
        type=_number(int, 1, maximum=COUNT_LIMIT),
        default=HIDDEN_SIZE,
        help="units in the hidden layer",
    )
    model.add_argument(
        "--lr",
        dest="learning_rate",
        metavar="LR",
        type=_number(float, 0, above=True),
        default=LEARNING_RATE,
        help="Adam's learning rate",
    )
    model.add_argument(
        "--batch-size", type=_number(int, 1, maximum=COUNT_LIMIT), default=BATCH_SIZE, help="images per batch"
    )
    model.add_argument(
        "--data-dir", default="./data", help="folder holding MNIST/raw/; MNIST is downloaded there if absent"
    )
    model.add_argument(
        "--num-workers",
        type=_number(int, 0, maximum=cpu_cores() + 1),  # each is a process: more than the cores only wait
        default=0,
        help="DataLoader worker processes, at most one per CPU core; 0 is fastest here",
    )

    # Lightning checks these values itself: main() reports what it refuses.
    trainer = parser.add_argument_group("Trainer (Lightning's arguments of the same names)")
    trainer.add_argument(
        "--fast-dev-run",
        type=_number(int, 0, maximum=COUNT_LIMIT),
        nargs="?",
        const=1,
        default=0,
        help="run N batches (1 if N is left out) of training, validation and test, to check the code",
    )
    trainer.add_argument(
        "--max-epochs",
        type=_number(int, -1, maximum=COUNT_LIMIT),
        default=NUM_EPOCHS,
        help="passes over the training set; -1: no end",
    )
    trainer.add_argument(
        "--gpus",
        type=_number(int, 0, maximum=COUNT_LIMIT),
        help="the video's Trainer(gpus=N): the same as --accelerator gpu --devices N",
    )
    trainer.add_argument("--accelerator", default="auto", help="hardware to train on: cpu, gpu, cuda, mps, tpu or auto")
    trainer.add_argument(
        "--devices",
        type=_int_or_text,
        default="auto",
        help="devices per machine: a number, -1 for all, a list like 0,1, or auto",
    )
    trainer.add_argument("--strategy", default="auto", help="how to spread training over devices, e.g. ddp")
    trainer.add_argument(
        "--num-nodes",
        type=_number(int, 1, maximum=COUNT_LIMIT),
        default=1,
        help="machines taking part in distributed training",
    )
    trainer.add_argument(
        "--precision",
        default="32-true",
        help="32-true, 16-mixed, bf16-mixed, bf16-true, 64-true, ... (the video's 16 is 16-mixed)",
    )
    trainer.add_argument(
        "--lr-find",
        action="store_true",
        help="run Lightning's learning-rate finder first and train with its suggestion",
    )
    trainer.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms only, for bit-identical reruns"
    )
    trainer.add_argument(
        "--seed", type=_number(int, 0, maximum=2**32), default=42, help="seed for the weights and the shuffling"
    )
    trainer.add_argument(
        "--gradient-clip-val", type=_number(float, 0), help="clip the gradient norm to this value; 0: no clipping"
    )
    trainer.add_argument(
        "--limit-train-batches",
        type=_batches,
        help="training batches per epoch: a number or a fraction (all if not given)",
    )
    trainer.add_argument(
        "--limit-val-batches", type=_batches, help="validation batches per epoch: a number or a fraction; 0 for none"
    )
    trainer.add_argument("--ckpt-path", help="checkpoint to resume training from, or to predict with")

    use = parser.add_argument_group("use the trained model")
    use.add_argument(
        "--predict",
        nargs="+",
        metavar="FILE",
        help="print the digit each picture shows, using --ckpt-path or else the best checkpoint of the newest run "
        "in ./lightning_logs; trains nothing. --accelerator, --devices, --precision and --batch-size apply",
    )
    # A model flag left out is None, which a continued run takes from its checkpoint and a new
    # run from the default that --help shows (model_arguments).
    args = parser.parse_args(argv, argparse.Namespace(**{name: None for name, _, _ in CHECKPOINT_FLAGS}))
    # Parsed again with nothing filled in: what the command line itself gives.
    unset = object()
    as_given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    given = [name for name, value in vars(as_given).items() if value is not unset]

    if args.predict:
        # --predict trains nothing: a flag that only training uses would be silently ignored.
        ignored = [{"learning_rate": "--lr"}.get(name, "--" + name.replace("_", "-")) for name in given
                   if name not in PREDICT_FLAGS]  # fmt: skip
        if ignored:
            parser.error(f"--predict trains nothing, so {', '.join(ignored)} would not apply: leave them out")
    elif args.ckpt_path is not None and args.lr_find:
        parser.error("--lr-find chooses the learning rate of a new run; a run continued with --ckpt-path keeps its own")
    elif args.learning_rate is not None and args.lr_find:
        parser.error("--lr-find chooses the learning rate itself: give --lr or --lr-find, not both")
    elif args.ckpt_path is not None and args.fast_dev_run:
        parser.error(
            "--fast-dev-run checks the code on new weights and saves nothing; to test a checkpoint, continue "
            "its run with --ckpt-path alone"
        )
    if args.max_epochs == 0 or args.limit_train_batches == 0:
        # Lightning would test the untrained weights and leave a run folder without a checkpoint.
        zero = "--max-epochs 0" if args.max_epochs == 0 else f"--limit-train-batches {args.limit_train_batches}"
        parser.error(f"{zero} trains nothing: give at least 1 (--max-epochs -1 trains with no end)")
    if args.gpus is not None and (args.accelerator != "auto" or args.devices != "auto"):
        parser.error("--gpus N already means --accelerator gpu --devices N; give one or the other")
    if args.ckpt_path is not None and not Path(args.ckpt_path).is_file():
        what = "is a folder, not" if Path(args.ckpt_path).is_dir() else "is no"
        parser.error(f"--ckpt-path: {args.ckpt_path} {what} checkpoint file")
    return args


## Main: train, test once, report


def main(argv: list[str] | None = None) -> int:
    """Train, validate and test, and print the test accuracy and the best checkpoint; or, with
    --predict, read the digits in pictures. The exit status is 0 when done, 1 after a problem
    that one `error:` line explains, 2 for a flag that the command line refuses, and 128 + the
    signal's number after a stop signal: 130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run = {"trainer": None, "folder": None, "phase": "set-up"}  # train_and_test fills it in as it goes
    # Every stop signal stops the run at once, except in Lightning's loops (see StopOnSignal).
    handlers = {signum: signal.signal(signum, stop_at_once) for signum in STOP_SIGNALS}
    stdout = sys.stdout
    try:
        filter_warnings()
        check_streams()
        sys.stdout = CheckedStdout(stdout)
        problem = working_folder_problem()
        if problem:
            raise RunError(problem)
        if args.predict:
            run["phase"] = "prediction"
            return predict(args)
        train_and_test(args, run)
        return 0
    except Stopped as stop:
        return report_interruption(stop.signal, run, args, argv)
    except ProcessExitedException as stop:  # --strategy ddp_spawn: its processes stopped as above, or died
        if stop.exit_code - 128 in STOP_SIGNALS:
            stopped_by = signal.Signals(stop.exit_code - 128)
            return report_interruption(stopped_by, run, args, argv, spawned=True)
        how = stop.signal_name or f"exit status {stop.exit_code}"
        return report_problem(
            RunError(
                f"a training process of --strategy ddp_spawn ended with {how}, as they can when interrupted: "
                "the checkpoints saved before are whole. --strategy ddp stops more cleanly."
            ),
            after_progress_bar=True,
        )
    except Exception as error:
        error = spawned_problem(error) if isinstance(error, ProcessRaisedException) else error
        if not is_problem(error):
            raise  # a bug of this script, whose traceback says where
        discard_unused_run_folder(run["folder"])
        return report_problem(error, after_progress_bar=run["phase"] not in ("set-up", "prediction"))
    finally:
        sys.stdout = stdout
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if dist.is_initialized():
            # Lightning keeps DDP's process group for the next fit or test; this run is done with it.
            # Left to the end of the process, its teardown can race with the other processes'.
            dist.destroy_process_group()


def noted_signal(trainer: pl.Trainer | None) -> signal.Signals | None:
    """The signal that StopOnSignal noted in the Trainer's loops, if any."""
    stoppers = [callback for callback in trainer.callbacks if isinstance(callback, StopOnSignal)] if trainer else []
    return stoppers[0].signal if stoppers else None


LR_FINDER_SMOOTHING = 0.9  # each point of the finder's loss curve is 0.9 of the one before and 0.1 of its step's loss


def find_learning_rate(trainer: pl.Trainer, model: LitNeuralNet) -> None:
    """Set the model's learning rate from a learning-rate range test: a tenth of the rate at
    which the loss, smoothed, was lowest."""
    # The video's Trainer(auto_lr_find=True) is gone in Lightning 2.x: the Tuner runs the
    # range test, training a few steps at rates rising from 1e-8 to 1, then puts the weights back.
    lr_finder = Tuner(trainer).lr_find(model, update_attr=False)
    if lr_finder is None:  # fast_dev_run skips it
        return
    if trainer.logger and rank_zero_only.rank == 0:
        # The finder's end wrote the run's hparams.yaml with no hyperparameters yet (Lightning 2.6
        # gives the logger back before that end), and TensorBoardLogger writes the file only when
        # there is none: without this, the rate the run trains with would never reach it.
        Path(trainer.logger.log_dir, "hparams.yaml").unlink(missing_ok=True)
    rates, losses = lr_finder.results["lr"], finder_losses(lr_finder.results["loss"])
    # Lightning's own suggestion, the steepest fall of a curve smoothed over about 50 steps of
    # the 100, lags behind the rates: on MNIST it picked 8e-05, which trains to 93.6% where the
    # video's 1e-3 reaches 97.4%. The lowest point of a curve smoothed over about 10 steps,
    # divided by 10 (fast.ai's rule, as the loss already climbs there), lands near 1e-3.
    smoothed, average = [], 0.0
    for step, loss in enumerate(losses, start=1):
        average = LR_FINDER_SMOOTHING * average + (1 - LR_FINDER_SMOOTHING) * loss
        smoothed.append(average / (1 - LR_FINDER_SMOOTHING**step))  # the early points are not pulled towards 0
    lowest = min(
        range(len(smoothed)), key=lambda index: smoothed[index] if math.isfinite(smoothed[index]) else math.inf
    )
    # Every DDP process ran its own test on its own batches: all train with rank 0's rate.
    suggestion = trainer.strategy.broadcast(rates[lowest] / 10)
    # What configure_optimizers uses; saved as the model's hyperparameters, not set in them, so
    # that hparams.yaml (written from those the model was built with) records it too.
    model.save_hyperparameters(model.hparams | {"learning_rate": suggestion})
    if rank_zero_only.rank != 0:
        return
    print(f"Learning-rate finder suggests {suggestion:.3g}; training with it.", file=sys.stderr)
    if trainer.logger and len(rates) > 1:
        picture = lr_find_picture(rates, smoothed, suggestion)
        to_pil_image(picture).save(Path(trainer.logger.log_dir, "lr_find.png"))
        trainer.logger.experiment.add_image("lr_find", picture, 0)


def finder_losses(reported: list[float]) -> list[float]:
    """Each step's loss in the learning-rate finder, from the running average that Lightning reports."""
    # Lightning 2.6 divides its running average by 1 - 0.98 ** (step + 1) to undo the pull
    # towards 0 of its early points, but counts the steps from 1 where the average counts them
    # from 0: its first point is half the loss, and the curve climbs over its first steps
    # (Lightning issue #14167). Undone here, that average gives back each step's own loss.
    beta = 0.98  # Lightning's _LRCallback's smoothing
    averages = [loss * (1 - beta ** (step + 2)) for step, loss in enumerate(reported)]
    return [
        (average - beta * before) / (1 - beta) for before, average in zip([0.0, *averages[:-1]], averages, strict=True)
    ]


def checkpoint_to_test(trainer: pl.Trainer, args: argparse.Namespace) -> str | None:
    """The best checkpoint of the run, to test once; None for the weights at hand."""
    # The path, rather than ckpt_path="best", says which of the two checkpoints is meant.
    best = trainer.checkpoint_callback.best_model_path  # RunCheckpoint keeps it only if its file is here
    if not best and args.ckpt_path and rank_zero_only.rank == 0:
        # A run continued from a checkpoint whose best is not beside it (copied alone), with no epoch since.
        print(
            f"The run's best checkpoint is not beside {shown(args.ckpt_path)}: testing that checkpoint's weights.",
            file=sys.stderr,
        )
    return best or None  # none when no epoch was validated: fast_dev_run, --limit-val-batches 0


def report_results(
    trainer: pl.Trainer, model: LitNeuralNet, args: argparse.Namespace, test_acc: float, tested: str | None
) -> None:
    """Print the run's result, and put it in TensorBoard's HParams tab beside the run's configuration."""
    if trainer.logger:
        # One row per run: its whole configuration beside the accuracies of the weights tested,
        # on the validation images (the best epoch's) and on the test images.
        config = {**vars(args), **model.hparams}  # the model's: after --lr-find, the rate it trained with
        # TensorBoard's table shows 5 columns at first: those whose values differ between the runs
        # shown (lr, epochs, hidden size, ...), then the rest by name. It can tell which differ only
        # when no run fixes the columns with an "experiment" summary, which Lightning's
        # log_hyperparams writes; so each run writes its values and results alone. A flag reads as
        # true or false (TensorBoard shows a bool as 0.0000 or 1.0000), and an unset one as None.
        config = {name: str(value).lower() if isinstance(value, bool) else value for name, value in config.items()}
        config = {name: "None" if value is None else value for name, value in config.items()}
        val_acc = trainer.checkpoint_callback.best_model_score
        metrics = {"hp/test_acc": test_acc} | ({"hp/val_acc": val_acc.item()} if val_acc is not None else {})
        trainer.logger.log_metrics(metrics)
        _, session_start, session_end = hparams(config, metrics)
        writer = trainer.logger.experiment.file_writer  # reopened by log_metrics after Lightning's finalize
        writer.add_summary(session_start)
        writer.add_summary(session_end)
        trainer.logger.finalize("success")  # writes them out; Lightning finalized the logger after the test
    best = shown(tested) if tested else "(none: no epoch was validated and saved; tested the last weights)"
    answer(f"Test accuracy: {100 * test_acc:.2f}%")
    if args.fast_dev_run:
        # A learner takes "41.00%" for a broken model; it is the point of the flag that it is no result.
        batches = f"{args.fast_dev_run} batch{'es' if args.fast_dev_run > 1 else ''}"
        answer(
            f"(--fast-dev-run: that is the accuracy on {batches} of test images after {batches} of training, "
            "a check that the code runs, not a result. Leave the flag out to train the model.)"
        )
    answer(f"Best checkpoint: {best}")
    if trainer.logger:
        answer(f"Run folder: {shown(trainer.logger.log_dir)}")
        answer(f"Open it in TensorBoard: tensorboard --logdir {shown(shlex.quote(trainer.logger.log_dir))}")


def report_interruption(
    stopped_by: signal.Signals, run: dict, args: argparse.Namespace, argv: list[str], spawned: bool = False
) -> int:
    """Say on stderr where a stop signal stopped the run, and how to continue it; the exit status
    is 128 + the signal's number, what a shell or a scheduler reports for a process it stopped."""
    if rank_zero_only.rank != 0:
        return 128 + stopped_by
    trainer, folder, phase = run["trainer"], run["folder"], run["phase"]
    last = folder / "checkpoints" / "last.ckpt" if folder else None  # build_trainer's `last`
    saved = torch.load(last, map_location="cpu", weights_only=True) if last and last.is_file() else None
    if spawned and saved:
        # Under --strategy ddp_spawn other processes trained; the checkpoint they saved says how far.
        epoch, step = saved["epoch"], saved["global_step"]
    else:
        epoch, step = (trainer.current_epoch, trainer.global_step) if trainer else (0, 0)
    where = {
        "set-up": "before training started",
        "the learning-rate finder": "during the learning-rate finder, before training",
        "training": f"in epoch {epoch} at step {step}"
        if step
        else "before training went on"
        if args.ckpt_path
        else "before the first training step",
        "after training": "after training had finished, before the final test",
        "the final test": "during the final test, after training had finished",
        "prediction": "while predicting",
    }[phase]
    if phase == "prediction":
        then = "Run the same command again."
    elif saved:
        # What the checkpoint holds, from its own data: the step where the run stopped, unless a
        # second signal stopped it at once, or the weights were NaN and were not saved.
        lost = max(step - saved["global_step"], 0) if phase == "training" else 0
        then = f"Continue it with:\n  {_resume_command(argv, last)}"
        if lost:
            then = f"last.ckpt holds step {saved['global_step']}: the {lost} steps after it are lost. {then}"
    elif args.ckpt_path:
        then = f"Continue it with the same command:\n  {_resume_command(argv, args.ckpt_path)}"
    else:
        then = "Nothing to continue: it had saved no checkpoint. Run the same command again."
        discard_unused_run_folder(folder)
    try:
        # On a line of its own, after the progress bar.
        print(f"\nStopped by {stopped_by.name} {where}. {then}", file=sys.stderr)
    except OSError:  # SIGHUP: the terminal is gone, and with it the reader; last.ckpt is saved all the same
        pass
    return 128 + stopped_by


def _resume_command(argv: list[str], checkpoint: str | Path) -> str:
    """The command that continues this run from checkpoint: the Python and the script that ran,
    with the run's flags and --ckpt-path set to checkpoint, quoted for a shell."""
    flags, value_follows = [], False
    # Left out: the --ckpt-path the run was started with, if any, and --lr-find, which a continued
    # run refuses (the rate it chose is in the checkpoint). argparse takes any unambiguous start of
    # a flag's name, with its value after a space or an "=": --ckpt-path PATH, --ckpt-path=PATH,
    # --ckpt PATH, --lr-f, ... (--lr itself is the rate's flag).
    for arg in argv:
        name = arg.partition("=")[0]
        is_ckpt_path = len(name) > 2 and "--ckpt-path".startswith(name)
        is_lr_find = len(name) > 2 and name != "--lr" and "--lr-find".startswith(name)
        if not (value_follows or is_ckpt_path or is_lr_find):
            flags.append(arg)
        value_follows = is_ckpt_path and "=" not in arg
    # The script as it was started; this file when main() was called from other code (a notebook, a test).
    script = sys.argv[0] if Path(sys.argv[0]).resolve() == Path(__file__).resolve() else __file__
    return shlex.join([sys.executable, script, *flags, "--ckpt-path", str(checkpoint)])


def spawned_problem(error: ProcessRaisedException) -> Exception:
    """The RunError or Lightning's refusal in a process of --strategy ddp_spawn, which arrives
    here as its traceback's text; the error itself when it is something else."""
    kind, _, message = str(error).strip().splitlines()[-1].partition(": ")
    if kind.endswith((".RunError", ".MisconfigurationException")):
        return RunError(message)
    return error


def is_problem(error: Exception) -> bool:
    """Whether an exception is a mistake in the input, a fault of the machine or a setting that
    Lightning refuses, which end a run with one `error:` line, rather than a bug of this script."""
    if isinstance(error, (RunError, MisconfigurationException, OSError, torch.OutOfMemoryError, dist.DistError)):
        return True
    if isinstance(error, Warning):  # made an error by PYTHONWARNINGS=error or python -W error
        return True
    return type(error) is RuntimeError and "can't allocate memory" in str(error)  # torch's, for the CPU


def report_problem(error: BaseException, after_progress_bar: bool = False) -> int:
    """Print a problem on one `error:` line (once, under DDP); the exit status is 1."""
    if isinstance(error, torch.OutOfMemoryError):
        message = f"the GPU ran out of memory ({error}): use a smaller --batch-size or --hidden-size."
    elif isinstance(error, dist.DistError):
        message = f"lost contact with the other processes of the run ({error})."
        if rank_zero_only.rank != 0:
            return 1  # a consequence: global rank 0 reports what went wrong
    elif isinstance(error, OSError) and error.strerror:
        advice = {errno.ENOSPC: " Free some space.", errno.EACCES: " Run it in a folder you can write to.",
                  errno.EROFS: " Run it in a folder you can write to."}.get(error.errno, "")  # fmt: skip
        message = f"{error.strerror}: {shown(error.filename)}.{advice}" if error.filename else f"{error}.{advice}"
    elif type(error) is RuntimeError:
        message = f"not enough memory ({error}): use a smaller --batch-size or --hidden-size."
    elif isinstance(error, Warning):
        message = (
            f"{type(error).__name__}: {error} (a warning, which PYTHONWARNINGS=error or python -W error "
            "makes an error: leave that setting out to see it as a warning)"
        )
    else:
        message = str(error)
    if rank_zero_only.rank == 0:
        if after_progress_bar:  # which ends without a newline
            print(file=sys.stderr)
        message = " ".join(line.strip() for line in message.splitlines())  # messages of torch and Lightning span lines
        print("error:", shown(message, keep_backslashes=True), file=sys.stderr)
    return 1


def shown(text: str | Path, keep_backslashes: bool = False) -> str:
    """text, a file name say, as one line that stdout and stderr can print, and that no other
    text prints as: a backslash doubled, and as backslash escapes a newline, a tab, a carriage
    return and what is not printable or not in the streams' encoding (a byte of a name that is
    not UTF-8 as that byte, \\xff; any other character as its bytes in UTF-8)."""
    encodings = [getattr(stream, "encoding", None) or "utf-8" for stream in (sys.stdout, sys.stderr)]

    def escaped(character: str) -> str:
        if character == "\\":
            return character if keep_backslashes else "\\\\"  # keep: a message whose paths are shown already
        if character in "\n\t\r":
            return repr(character)[1:-1]
        try:
            if character.isprintable():
                for encoding in encodings:
                    character.encode(encoding)
                return character
        except UnicodeEncodeError:
            pass
        try:  # Python hands over a byte of a name that is not text as a lone surrogate, \udcff for \xff
            return "".join(
                f"\\x{byte:02x}" for byte in character.encode(sys.getfilesystemencoding(), "surrogateescape")
            )
        except UnicodeEncodeError:  # a lone surrogate that stands for no byte
            return f"\\u{ord(character):04x}"

    return "".join(escaped(character) for character in str(text))


def answer(line: str) -> None:
    """Print a result on stdout, at once: if it cannot be written there, CheckedStdout says so while main() runs."""
    print(line, flush=True)


class CheckedStdout:
    """sys.stdout while main() runs, for this script's results and Lightning's progress bar and
    tables: a write that fails (a closed pipe, a full disk) is a RunError that names stdout,
    where the OSError would name no file."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as error:
            raise self._failed(error) from error

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as error:
            raise self._failed(error) from error

    def _failed(self, error: OSError) -> RunError:
        # What is left in the stream's buffer would fail again as Python exits, with a complaint of its own.
        with contextlib.suppress(OSError):  # a stream with no file descriptor (a notebook's) has nothing left
            to_devnull(self.stream.fileno())
        return RunError(f"could not write to stdout ({error.strerror}), so the results printed there are incomplete.")

    def __getattr__(self, name: str):  # the rest (encoding, isatty, fileno) is the stream's
        return getattr(self.stream, name)


def to_devnull(descriptor: int) -> None:
    """Make a file descriptor write to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != descriptor:
        os.dup2(devnull, descriptor)
        os.close(devnull)


def check_streams() -> None:
    """Refuse to start when stdout is closed (`>&-`), where the results would be lost; when stderr
    is closed, send its messages nowhere rather than to stdout, where print would put them."""
    if sys.stderr is None:  # Python's, for a stream closed when it started
        try:
            os.fstat(2)
        except OSError:  # and keep it from being a file the run opens, which the messages of C libraries would go into
            to_devnull(2)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (open for as long as the process runs)
    if sys.stdout is None:
        raise RunError("stdout is closed, and the results would be lost: send it to a file, or to /dev/null.")


## Use the trained model


def predict(args: argparse.Namespace) -> int:
    """--predict: print the digit each picture shows, a line per picture in the order given; the
    exit status is 1 when a picture could not be read."""
    checkpoint = args.ckpt_path or newest_best_checkpoint(Path("lightning_logs"))
    if checkpoint is None:
        raise RunError(
            "no checkpoint in ./lightning_logs to predict with: train one first (python lightning_mnist.py), "
            "or pass --ckpt-path"
        )
    read_checkpoint(checkpoint)  # one line for a damaged file or another model's, never torch's own words
    model = LitNeuralNet.load_from_checkpoint(checkpoint, map_location="cpu")
    refuse_diverged(checkpoint, model.state_dict())
    # stdout holds one line per picture, for grep and friends; the rest goes to stderr.
    print(f"Checkpoint: {shown(checkpoint)}", file=sys.stderr)
    accelerator, devices = ("gpu", args.gpus) if args.gpus else (args.accelerator, args.devices)
    lightning_logger = logging.getLogger("pytorch_lightning")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.WARNING)  # no banners about GPUs between the lines
    try:
        return predict_pictures(args, model, accelerator, devices)
    finally:
        lightning_logger.setLevel(level)  # for the runs that follow in this process, as tests make


def predict_pictures(args: argparse.Namespace, model: LitNeuralNet, accelerator: str, devices: int | str) -> int:
    """Print the digit each picture of --predict shows, as the model reads it; 1 when a picture could not be read."""
    trainer = lightning_trainer(
        accelerator=accelerator,
        devices=1 if devices == "auto" else devices,  # not every GPU, which "auto" means
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if trainer.world_size > 1:
        # DDP would share the pictures out between processes, each printing its own.
        raise RunError("--predict runs on one device: ask for one (--devices 1, or --gpus 1)")

    status, paths, images = 0, [], []
    for path in args.predict:
        try:
            images.append(prepare_digit(path))
            paths.append(path)
        except PictureError as error:  # say which, and go on with the others
            status = report_problem(RunError(f"{shown(path)}: {error}"))
    if images:
        batches = trainer.predict(model, DataLoader(torch.stack(images), batch_size=args.batch_size or BATCH_SIZE))
        for path, probabilities, image in zip(paths, torch.cat(batches), images, strict=True):
            (first, second), (digit, runner_up) = (top.tolist() for top in probabilities.topk(2))
            reasons = doubts(probabilities, image)  # on the same line, so that each picture keeps one
            unsure = f"; unsure: {', '.join(reasons)}" if reasons else ""
            answer(f"{shown(path)}: {digit} ({100 * first:.1f}%; next {runner_up} at {100 * second:.1f}%){unsure}")
    return status


def newest_best_checkpoint(logs: Path) -> Path | None:
    """The best epoch's checkpoint of the newest run in logs that validated one: the run that saved
    a checkpoint last, and its best by the scores its checkpoints store, whatever their names."""
    runs = [folder for folder in logs.glob("*/checkpoints") if folder.is_dir()]
    for run in sorted(runs, key=lambda folder: max((path.stat().st_mtime for path in folder.glob("*.ckpt")), default=0),
                      reverse=True):  # fmt: skip
        best = best_stored_checkpoint(run)
        if best:
            return best
    return None


if __name__ == "__main__":
    sys.exit(main())
