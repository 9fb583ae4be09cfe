"""MNIST digit classification with PyTorch Lightning 2.x.

The feed-forward network (784 -> 500 -> ReLU -> 10) of the "convert your PyTorch model
to Lightning" tutorial, on the current Lightning API. It trains on 55,000 MNIST images,
validates on the other 5,000 training images, and tests once on the 10,000 test images
with the checkpoint that validated best.

    python lightning_mnist.py                  # 2 epochs: about 97.3% test accuracy
    python lightning_mnist.py --fast-dev-run   # one batch through every step, to check the code
    python lightning_mnist.py --predict 7.png  # the digit in your own picture, read by the best checkpoint
    tensorboard --logdir lightning_logs        # the curves, the mistakes, the hyperparameters

Where Lightning 2.x differs from the video, a comment says so at that place.
"""

import argparse
import logging
import pickle
import re
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.datasets import MNIST
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, make_grid

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
        self.example_input_array = torch.zeros(1, 1, 28, 28)  # the model summary shows shapes and FLOPs for it
        # Metrics that add up every batch of an epoch, weighted by its images; Lightning
        # computes them at the end of the epoch, across all processes, and resets them.
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")  # correct images / all images
        self.test_loss = MeanMetric()
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

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
        self.log("val_acc", self.val_acc, prog_bar=True)
        return logits  # for callbacks such as ValidationPictures

    def on_validation_epoch_end(self) -> None:
        # Lightning 2.x removed the video's validation_epoch_end(outputs), which stacked every
        # step's loss to average them: the MeanMetric has summed them as the steps ran.
        # As in the video, the epoch's mean loss goes to the progress bar as val_loss and to
        # TensorBoard as avg_val_loss.
        self.log("val_loss", self.val_loss, prog_bar=True)
        self.log("avg_val_loss", self.val_loss)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_loss.update(F.cross_entropy(logits, labels), weight=len(labels))
        self.test_acc.update(logits, labels)
        self.log_dict({"test_loss": self.test_loss, "test_acc": self.test_acc})

    def predict_step(self, batch: torch.Tensor, batch_idx: int = 0) -> torch.Tensor:
        # Trainer.predict returns what this returns for each batch of pictures (prepared by
        # prepare_digit below): each picture's probability of being each digit.
        return self(batch).softmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused=True updates all the weights in one go: a step on a CPU is about a tenth faster.
        # TPUs have no fused Adam, and Lightning cannot clip (--gradient-clip-val) the gradients
        # of a fused optimizer under mixed precision: there Adam runs unfused.
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


## MNIST, held in memory as tensors

MNIST_MEAN = 0.1307  # mean pixel value of the MNIST training images, scaled to [0, 1]
MNIST_STD = 0.3081  # and their standard deviation
VAL_FRACTION = 1 / 12  # 5,000 of the 60,000 training images are held out for validation
SPLIT_SEED = 42  # fixed, so every run validates on the same 5,000 images


class DataError(Exception):
    """The MNIST files are missing, unreadable or wrong; the message says what to do."""


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
    )


def download_mnist(data_dir: str) -> None:
    """Download MNIST into data_dir unless its four files are there, or say what to do."""
    raw = Path(data_dir, "MNIST", "raw")
    if all((raw / Path(name).stem).is_file() for name, _ in MNIST.resources):
        return
    try:
        for train in (True, False):
            MNIST(data_dir, train=train, download=True)
    except Exception as error:  # no network, a proxy, a full disk, ...
        files = ", ".join(Path(name).stem for name, _ in MNIST.resources)
        raise DataError(
            f"MNIST is not in {Path(data_dir).resolve()} and could not be downloaded ({error}). "
            f"Put the four MNIST files ({files}, each optionally .gz) into {raw}, "
            "or point --data-dir at the folder that holds MNIST/raw/."
        ) from error


def load_mnist(data_dir: str, train: bool) -> MNISTTensors:
    """Read one MNIST split through torchvision, as tensors, or say what is wrong."""
    raw = Path(data_dir, "MNIST", "raw")
    try:
        mnist = MNIST(data_dir, train=train)
    except Exception as error:  # torchvision reports truncated or corrupt files in many ways
        raise DataError(
            f"the MNIST files in {raw} could not be read ({type(error).__name__}: {error}). "
            "Delete them to download them again, or point --data-dir at an intact copy."
        ) from error
    # torchvision checks each file's header, not that the files make a usable data set:
    # wrong ones would otherwise fail in the middle of training, far from the cause.
    split = "train" if train else "t10k"
    images_file, labels_file = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
    images, labels = mnist.data, mnist.targets
    if images.shape[1:] != (28, 28):
        height, width = images.shape[1:]
        raise DataError(f"{images_file} holds {height}x{width} images; MNIST images are 28x28.")
    if len(labels) != len(images):
        raise DataError(f"{labels_file} holds {len(labels)} labels for the {len(images)} images in {images_file}.")
    if (labels >= NUM_CLASSES).any():
        raise DataError(f"{labels_file} holds labels up to {labels.max()}; MNIST labels are 0-{NUM_CLASSES - 1}.")
    return MNISTTensors(images, labels)


def load_mnist_train_and_val(data_dir: str) -> tuple[MNISTTensors, MNISTTensors]:
    """The training images, split into a training set and a fixed held-out validation set."""
    full = load_mnist(data_dir, train=True)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_size = round(len(full) * VAL_FRACTION)
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


def prepare_digit(picture: str | Path | Image.Image) -> torch.Tensor:
    """A picture of one digit (a file or a Pillow image) as MNIST's images are: (1, 28, 28), normalised.

    Raises PictureError, with the reason, for a file that is missing or no picture, and for a picture
    that holds nothing but background."""
    if not isinstance(picture, Image.Image):
        picture = open_picture(picture)
    picture = ImageOps.exif_transpose(picture)  # photos taken sideways, as their camera says
    if picture.mode.startswith("I"):  # 16-bit grey, which convert() would clip at 255 rather than scale
        picture = picture.convert("I").point(lambda value: value / 257)
    picture = picture.convert("LA")  # grey and alpha, from any of Pillow's modes
    picture.thumbnail((LARGEST_SIDE, LARGEST_SIDE))
    grey, alpha = (pil_to_tensor(channel)[0] / 255 for channel in picture.split())
    if (alpha < 1).any():
        # Transparent pixels are background, as in drawing programs' exports: lay the strokes on
        # paper of the opposite shade, white behind dark strokes and black behind light ones.
        strokes = (grey * alpha).sum() / alpha.sum().clamp(min=1)  # their mean shade; 0 if there are none
        paper = 1.0 if strokes < 0.5 else 0.0
        grey = grey * alpha + paper * (1 - alpha)
    # The background is the shade of most of the picture's edge. Nearer the lightest pixel than the
    # darkest, it is paper: invert, since MNIST's digits are light on black.
    background = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).median()
    if background > (grey.min() + grey.max()) / 2:
        grey, background = 1 - grey, 1 - background
    ink = (grey - background).clamp(min=0)
    if ink.max() < MIN_CONTRAST:
        raise PictureError("nothing but background: no digit found")
    ink = ink / ink.max()  # the strongest stroke full white, as in MNIST
    ink[ink < INK_THRESHOLD] = 0
    # Crop to the digit, and scale it to fit the 20x20 box with its aspect ratio kept.
    rows, columns = ink.any(dim=1).nonzero(), ink.any(dim=0).nonzero()
    ink = ink[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    scale = DIGIT_BOX / max(ink.shape)
    size = [max(1, round(side * scale)) for side in ink.shape]
    ink = F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
    # Place it in 28x28 so that its centre of mass falls on MNIST's (negative padding crops).
    height, width = ink.shape
    row = (ink.sum(dim=1) * torch.arange(height)).sum() / ink.sum()
    column = (ink.sum(dim=0) * torch.arange(width)).sum() / ink.sum()
    top, left = round(MNIST_CENTRE - row.item()), round(MNIST_CENTRE - column.item())
    image = F.pad(ink, (left, MNIST_SIDE - left - width, top, MNIST_SIDE - top - height))
    return ((image - MNIST_MEAN) / MNIST_STD).unsqueeze(0)


## Pictures in TensorBoard

GRID_IMAGES = 32  # validation images shown with the model's guess, the same ones every epoch
GRID_COLUMNS = 8  # so 4 rows of 8


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
    """Normalised images in a grid, each framed and labelled with the model's guess: green if right, red if wrong."""
    pixels = (images.float().cpu() * MNIST_STD + MNIST_MEAN).clamp(0, 1)  # undo the normalisation
    pixels = F.interpolate(pixels, scale_factor=2)  # 56x56 pixels, room for a label in a corner
    size, padding = pixels.shape[-1], 4
    grid = make_grid(pixels, nrow=GRID_COLUMNS, padding=padding, pad_value=1)  # (3, height, width) in [0, 1]
    frames, captions, colours = [], [], []
    for index, (predicted, true) in enumerate(zip(predictions.tolist(), labels.tolist(), strict=True)):
        row, column = divmod(index, GRID_COLUMNS)
        left, top = padding + column * (size + padding), padding + row * (size + padding)
        frames.append((left, top, left + size - 1, top + size - 1))
        captions.append(str(predicted) if predicted == true else f"{predicted}, is {true}")
        colours.append("green" if predicted == true else "red")
    return draw_bounding_boxes(
        grid, torch.tensor(frames), captions, colours, width=2, fill_labels=True, label_colors="white"
    )


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


## Runs: a folder of their own, checkpoints, the Trainer

LOG_EVERY_N_STEPS = 10  # train_loss to TensorBoard and the progress bar: 110 points in a default run

# Keep the output to what a user can act on. Lightning 2.6 advertises its cloud logger at
# every start; its own code trips a deprecation warning of newer torch; and on machines with
# more than 2 cores it suggests DataLoader workers, which would slow this script down (see
# mnist_loader). For data that needs decoding, that tip is right: delete its filter then.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")


@rank_zero_only
def claim_run_folder(save_dir: Path) -> int:
    """The number N of a new save_dir/lightning_logs/version_N folder, made by this call."""
    # TensorBoardLogger takes the highest version_N it finds plus one, so two runs started at
    # once in one folder can take the same one and overwrite each other's checkpoints. A mkdir
    # either creates the folder or fails, atomically: the run whose mkdir succeeds owns it.
    # Only global rank 0 claims one (other DDP processes get None); they write nothing.
    logs = save_dir / "lightning_logs"
    logs.mkdir(parents=True, exist_ok=True)
    versions = [int(path.name[8:]) for path in logs.glob("version_*") if path.name[8:].isdigit()]
    version = max(versions, default=-1) + 1
    while True:
        try:
            (logs / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


def newest_best_checkpoint(logs: Path) -> Path | None:
    """The best epoch's checkpoint of the newest run (the highest version_N) in logs that saved one."""
    runs = [path for path in logs.glob("version_*") if path.name.removeprefix("version_").isdigit()]
    for run in sorted(runs, key=lambda path: int(path.name.removeprefix("version_")), reverse=True):
        best = list(run.glob("checkpoints/epoch=*-val_acc=*.ckpt"))  # named by build_trainer's `best`
        if best:
            return max(best, key=lambda path: float(re.search(r"val_acc=(\d+\.\d+)", path.name).group(1)))
    return None


def build_trainer(args: argparse.Namespace) -> pl.Trainer:
    """A Trainer configured by the command line, checkpointing the best epoch by val_acc."""
    # The video's Trainer(gpus=N) is gone in Lightning 2.x: accelerator="gpu", devices=N.
    accelerator, devices = ("gpu", args.gpus) if args.gpus else (args.accelerator, args.devices)
    # The best epoch by val_acc, which the final test uses; the video's Lightning saved the
    # latest epoch instead.
    best = ModelCheckpoint(monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.4f}")
    # The latest epoch, to resume from. Lightning 2.6 rewrites save_last=True's last.ckpt only
    # when val_acc improves, so a second checkpoint holds it. When Ctrl-C or SIGTERM stops
    # training, Lightning saves it there and then, in the middle of the epoch.
    last = ModelCheckpoint(filename="last", enable_version_counter=False, save_on_exception=True)
    logger = False
    if not args.fast_dev_run:  # which logs and saves nothing
        # The HParams tab gets the accuracies that main() logs, instead of a placeholder "hp_metric".
        version = claim_run_folder(Path.cwd())
        logger = TensorBoardLogger(save_dir=Path.cwd(), version=version, default_hp_metric=False)
    return pl.Trainer(
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
        # Redrawing the bar at every step of a fast net costs more than the step itself.
        callbacks=[best, last, ValidationPictures(), TQDMProgressBar(refresh_rate=LOG_EVERY_N_STEPS)],
        logger=logger,
    )


## Command line: every Trainer feature the video shows, as a flag


def _number(kind: type, minimum: float, above: bool = False):
    """An argparse type for a number of `kind` at least (or above) `minimum`, whose errors say so."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if above else value >= minimum) or value == float("inf"):
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"expected {what} {'above' if above else 'of at least'} {minimum}, got {text!r}"
            )
        return value

    return parse


def _int_or_text(text: str) -> int | str:
    """Lightning's devices: a number, or text such as "auto" or "0,1"."""
    try:
        return int(text)
    except ValueError:
        return text


def _batches(text: str) -> int | float:
    """Lightning's limit_*_batches: a number of batches (an integer) or a fraction of them."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected a number of batches (10) or a fraction of them (0.25), got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; each default is set here once and shown by --help."""
    parser = argparse.ArgumentParser(
        description="Train the tutorial's feed-forward MNIST classifier with PyTorch Lightning, "
        "or read your own pictures of digits with it (--predict).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model and data (LitNeuralNet's arguments)")
    model.add_argument("--hidden-size", type=_number(int, 1), default=HIDDEN_SIZE, help="units in the hidden layer")
    model.add_argument(
        "--lr",
        dest="learning_rate",
        metavar="LR",
        type=_number(float, 0, above=True),
        default=LEARNING_RATE,
        help="Adam's learning rate",
    )
    model.add_argument("--batch-size", type=_number(int, 1), default=BATCH_SIZE, help="images per batch")
    model.add_argument(
        "--data-dir", default="./data", help="folder holding MNIST/raw/; MNIST is downloaded there if absent"
    )
    model.add_argument(
        "--num-workers", type=_number(int, 0), default=0, help="DataLoader worker processes; 0 is fastest here"
    )

    # Lightning checks these values itself: main() reports what it refuses.
    trainer = parser.add_argument_group("Trainer (Lightning's arguments of the same names)")
    trainer.add_argument(
        "--fast-dev-run",
        type=int,
        nargs="?",
        const=1,
        default=0,
        help="run N batches (1 if N is left out) of training, validation and test, to check the code",
    )
    trainer.add_argument("--max-epochs", type=int, default=NUM_EPOCHS, help="passes over the training set; -1: no end")
    trainer.add_argument(
        "--gpus", type=int, help="the video's Trainer(gpus=N): the same as --accelerator gpu --devices N"
    )
    trainer.add_argument("--accelerator", default="auto", help="hardware to train on: cpu, gpu, cuda, mps, tpu or auto")
    trainer.add_argument(
        "--devices",
        type=_int_or_text,
        default="auto",
        help="devices per machine: a number, -1 for all, a list like 0,1, or auto",
    )
    trainer.add_argument("--strategy", default="auto", help="how to spread training over devices, e.g. ddp")
    trainer.add_argument("--num-nodes", type=int, default=1, help="machines taking part in distributed training")
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
    trainer.add_argument("--seed", type=int, default=42, help="seed for the weights and the shuffling")
    trainer.add_argument("--gradient-clip-val", type=float, help="clip the gradient norm to this value")
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
    args = parser.parse_args(argv)

    if args.gpus is not None and (args.accelerator != "auto" or args.devices != "auto"):
        parser.error("--gpus N already means --accelerator gpu --devices N; give one or the other")
    if args.ckpt_path is not None and not Path(args.ckpt_path).is_file():
        parser.error(f"--ckpt-path: no checkpoint file at {args.ckpt_path}")
    return args


## Main: train, test once, report


def _fail(message: str) -> int:
    """Report a problem the user can fix, on one line and without a traceback; the exit status is 1."""
    print("error:", *message.split(), file=sys.stderr)  # messages of torch and Lightning span lines
    return 1


def _resume_command(argv: list[str], checkpoint: Path) -> str:
    """This run's command line with --ckpt-path set to checkpoint, which continues the run."""
    flags, after_ckpt_path = [], False
    for arg in argv:  # leave out the --ckpt-path the run was started with, if any
        if not (after_ckpt_path or arg == "--ckpt-path" or arg.startswith("--ckpt-path=")):
            flags.append(arg)
        after_ckpt_path = arg == "--ckpt-path"
    return shlex.join(["python", sys.argv[0], *flags, "--ckpt-path", str(checkpoint)])


def _report_interruption(trainer: pl.Trainer, argv: list[str]) -> int:
    """Say how to continue a run that Ctrl-C or SIGTERM stopped; the exit status is 128 + the signal's number."""
    # 130 and 143 are what a shell or a scheduler reports for a process stopped by SIGINT or SIGTERM.
    stopped_by = signal.SIGTERM if trainer.received_sigterm else signal.SIGINT
    if trainer.is_global_zero:
        folder = trainer.checkpoint_callback.dirpath
        checkpoint = Path(folder, "last.ckpt") if folder else None  # build_trainer's `last`
        if trainer.global_step and checkpoint and checkpoint.is_file():
            print(
                f"Training stopped by {stopped_by.name} in epoch {trainer.current_epoch} at step "
                f"{trainer.global_step}; Lightning saved it in {checkpoint}."
            )
            print(f"Continue it with:\n  {_resume_command(argv, checkpoint)}")
        else:
            print(f"Training stopped by {stopped_by.name} before its first step: nothing to continue.")
    return 128 + stopped_by


def predict(args: argparse.Namespace) -> int:
    """--predict: print the digit each picture shows, a line per picture in the order given."""
    checkpoint = args.ckpt_path or newest_best_checkpoint(Path("lightning_logs"))
    if checkpoint is None:
        return _fail(
            "no checkpoint in ./lightning_logs to predict with: train one first (python lightning_mnist.py), "
            "or pass --ckpt-path"
        )
    try:
        model = LitNeuralNet.load_from_checkpoint(checkpoint)
    # What torch and Lightning raise for a file that is damaged or not a checkpoint of this model.
    except (OSError, EOFError, KeyError, RuntimeError, TypeError, ValueError, pickle.UnpicklingError) as error:
        reason = "of another model" if "state_dict" in str(error) else "damaged, or not a checkpoint of this script"
        return _fail(f"{checkpoint} cannot be loaded: it is {reason}")
    # stdout holds one line per picture, for grep and friends; the rest goes to stderr.
    print(f"Checkpoint: {checkpoint}", file=sys.stderr)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no banners about GPUs between the lines
    accelerator, devices = ("gpu", args.gpus) if args.gpus else (args.accelerator, args.devices)
    try:
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1 if devices == "auto" else devices,  # not every GPU, which "auto" means
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, TypeError, ImportError) as error:  # Lightning checks its arguments
        return _fail(f"the Trainer cannot be set up as asked: {error}")
    if trainer.world_size > 1:
        # DDP would share the pictures out between processes, each printing its own.
        return _fail("--predict runs on one device: ask for one (--devices 1, or --gpus 1)")

    status, paths, images = 0, [], []
    for path in args.predict:
        try:
            images.append(prepare_digit(path))
            paths.append(path)
        except PictureError as error:  # say which, and go on with the others
            status = _fail(f"{path}: {error}")
    if images:
        batches = trainer.predict(model, DataLoader(torch.stack(images), batch_size=args.batch_size))
        for path, probabilities in zip(paths, torch.cat(batches), strict=True):
            (first, second), (digit, runner_up) = (top.tolist() for top in probabilities.topk(2))
            print(f"{path}: {digit} ({100 * first:.1f}%; next {runner_up} at {100 * second:.1f}%)")
    return status


def main(argv: list[str] | None = None) -> int:
    """Train, validate and test; print the test accuracy and the best checkpoint. Or, with --predict, predict."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.predict:
        return predict(args)
    pl.seed_everything(args.seed, workers=True)
    model = LitNeuralNet(
        hidden_size=args.hidden_size,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        num_workers=args.num_workers,
    )
    try:
        trainer = build_trainer(args)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as error:  # Lightning checks its arguments
        hint = ""
        if (args.gpus or args.accelerator in ("gpu", "cuda")) and not torch.cuda.is_available():
            hint = " This machine has no GPU that torch can use: leave out --gpus/--accelerator to train on the CPU."
        return _fail(f"the Trainer cannot be set up as asked: {error}{hint}")
    try:
        if args.lr_find:
            # The video's Trainer(auto_lr_find=True) is gone in Lightning 2.x: the Tuner
            # runs the learning-rate range test and sets the suggestion on the model.
            lr_finder = Tuner(trainer).lr_find(model)
            suggestion = lr_finder.suggestion() if lr_finder else None
            if suggestion is not None and trainer.is_global_zero:
                print(f"Learning-rate finder suggests {suggestion:.3g}; training with it.")
            if lr_finder and trainer.is_global_zero and trainer.logger:
                # The loss at each learning rate tried, the suggestion marked with a red dot.
                figure = Figure()
                lr_finder.plot(suggest=True, ax=figure.add_subplot())
                figure.savefig(Path(trainer.logger.log_dir, "lr_find.png"))
                trainer.logger.experiment.add_figure("lr_find", figure)
        trainer.fit(model, ckpt_path=args.ckpt_path)
        # Test once, with the weights that validated best. With no checkpoint (fast_dev_run,
        # --limit-val-batches 0) that is the last weights. The path, rather than
        # ckpt_path="best", says which of the two checkpoints is meant.
        best_path = trainer.checkpoint_callback.best_model_path or None
        results = trainer.test(model, ckpt_path=best_path)
    except (DataError, MisconfigurationException) as error:  # a setting that does not fit the data, say
        return _fail(str(error))
    except SystemExit:
        # Lightning stops a run on Ctrl-C or SIGTERM with SystemExit, after saving last.ckpt.
        if not trainer.interrupted:
            raise
        return _report_interruption(trainer, argv)
    if trainer.is_global_zero:
        test_acc = results[0]["test_acc"]
        if trainer.logger:
            # TensorBoard's HParams tab: one row per run, its whole configuration beside the
            # accuracies of the weights tested, on the validation images (the best epoch's) and the test images.
            config = {**vars(args), **model.hparams}  # the model's: after --lr-find, the rate it trained with
            val_acc = trainer.checkpoint_callback.best_model_score
            metrics = {"hp/test_acc": test_acc} | ({"hp/val_acc": val_acc.item()} if val_acc is not None else {})
            trainer.logger.log_hyperparams(config, metrics)
            trainer.logger.finalize("success")  # writes them out; Lightning finalized the logger after the test
        print(f"Test accuracy: {100 * test_acc:.2f}%")
        print(f"Best checkpoint: {best_path or '(none: no epoch was validated and saved; tested the last weights)'}")
        if trainer.logger:
            print(f"Run folder: {trainer.logger.log_dir}")
            print(f"Open it in TensorBoard: tensorboard --logdir {shlex.quote(trainer.logger.log_dir)}")
    if dist.is_initialized():
        # Lightning keeps DDP's process group for the next fit or test; this run is done with it.
        # Left to the end of the process, its teardown can race with the other processes'.
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
