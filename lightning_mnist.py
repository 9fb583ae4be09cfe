"""MNIST digit classification with PyTorch Lightning 2.x.

The feed-forward network (784 -> 500 -> ReLU -> 10) from the "convert your PyTorch
model to Lightning" tutorial, on the current Lightning API: training, validation on
5,000 images held out of the training set, and one test on the 10,000 test images
with the best checkpoint.

    python lightning_mnist.py                  # 2 epochs, about 97.4% test accuracy
    python lightning_mnist.py --fast-dev-run   # one batch through every step
    python lightning_mnist.py --accelerator cpu --devices 2 --strategy ddp   # two processes
    tensorboard --logdir lightning_logs        # the curves, the mistakes, the hyperparameters

Where Lightning 2.x differs from the video, a comment says so at that place.
"""

import argparse
import logging
import shlex
import signal
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchmetrics
from lightning_fabric.utilities.exceptions import MisconfigurationException
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import MNIST
from torchvision.utils import draw_bounding_boxes, make_grid

IMAGE_SIZE = 28  # MNIST images are 28x28 pixels
INPUT_SIZE = IMAGE_SIZE * IMAGE_SIZE  # flattened
NUM_CLASSES = 10  # the digits 0-9
MNIST_MEAN = 0.1307  # mean pixel value of the MNIST training images, scaled to [0, 1]
MNIST_STD = 0.3081  # and their standard deviation
VAL_FRACTION = 1 / 12  # 5,000 of the 60,000 training images are held out for validation
SPLIT_SEED = 42  # fixed, so every run validates on the same 5,000 images
LOG_EVERY_N_STEPS = 10  # train_loss to TensorBoard and the progress bar: 110 points in a default run
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
GRID_IMAGES = 32  # validation images shown in TensorBoard with the model's guess, the same ones every epoch
GRID_COLUMNS = 8  # so 4 rows of 8

# Keep the output to what a user can act on: Lightning 2.6 advertises its cloud logger
# at every start, its own code trips a deprecation warning of newer torch, and after
# Ctrl-C or SIGTERM it reports the saved checkpoint in a garbled line that main() says better.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: not any(text in record.getMessage() for text in ("litlogger", "was raised with message"))
)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# On machines with more than 2 cores Lightning suggests DataLoader workers. They would only
# slow this script down (see _dataloader below); for data that needs decoding, the tip is right.
warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")


class DataError(Exception):
    """The MNIST files are missing, unreadable or wrong; the message says what to do."""


## Data: MNIST held in memory as uint8 tensors


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
        # The DataLoader hands over the whole batch of indices at once, so a batch is
        # one gather and one normalisation instead of 100 PIL images and a collate.
        index = torch.as_tensor(indices)
        images = self.images[index].unsqueeze(1).float().div_(255)
        return images.sub_(MNIST_MEAN).div_(MNIST_STD), self.labels[index]


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for batches that ``MNISTTensors.__getitems__`` already built."""
    return batch


def mnist_files_present(data_dir: str) -> bool:
    """Whether the four MNIST files are where torchvision looks for them."""
    raw = Path(data_dir, "MNIST", "raw")
    return all((raw / Path(name).stem).is_file() for name, _ in MNIST.resources)


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
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        height, width = images.shape[1:]
        raise DataError(f"{images_file} holds {height}x{width} images; MNIST images are {IMAGE_SIZE}x{IMAGE_SIZE}.")
    if len(labels) != len(images):
        raise DataError(f"{labels_file} holds {len(labels)} labels for the {len(images)} images in {images_file}.")
    if (labels >= NUM_CLASSES).any():
        raise DataError(f"{labels_file} holds labels up to {labels.max()}; MNIST labels are 0-{NUM_CLASSES - 1}.")
    return MNISTTensors(images, labels)


## Pictures for TensorBoard


def predictions_grid(images: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised images in a grid, each framed and labelled with the model's guess: green if right, red if wrong."""
    pixels = (images.cpu() * MNIST_STD + MNIST_MEAN).clamp(0, 1)  # undo the normalisation, on the CPU to draw
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


## Model: the LightningModule


class LitNeuralNet(pl.LightningModule):
    """A feed-forward net, 784 -> hidden -> ReLU -> 10, that trains itself on MNIST."""

    def __init__(
        self,
        input_size: int = INPUT_SIZE,
        hidden_size: int = 500,
        num_classes: int = NUM_CLASSES,
        learning_rate: float = 1e-3,
        batch_size: int = 100,
        data_dir: str = "./data",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        # Stored in every checkpoint, so `LitNeuralNet.load_from_checkpoint(path)` needs
        # nothing else, and shown in TensorBoard.
        self.save_hyperparameters()
        self.flatten = nn.Flatten()
        self.l1 = nn.Linear(input_size, hidden_size)
        self.relu = nn.ReLU()
        self.l2 = nn.Linear(hidden_size, num_classes)
        # torchmetrics accumulate over the epoch, weighted by batch size, and sync across
        # DDP processes; each is logged once an epoch, which costs far less than a self.log
        # call at every step.
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.val_loss_mean = torchmetrics.MeanMetric()
        self.val_confusion = torchmetrics.classification.MulticlassConfusionMatrix(num_classes)
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
        self.test_loss_mean = torchmetrics.MeanMetric()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.l1(self.flatten(images))
        out = self.relu(out)
        return self.l2(out)  # raw logits: cross_entropy applies the softmax

    def _loss_and_logits(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of one batch, the same for training, validation and test."""
        images, labels = batch
        logits = self(images)
        return F.cross_entropy(logits, labels), logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss_and_logits(batch)
        # The video returned {"loss": loss, "log": {...}}; Lightning 2.x takes the loss
        # and logs through self.log. A self.log call costs a good part of a step of this
        # small net, so it is made only on the steps that Lightning writes to TensorBoard,
        # every log_every_n_steps (never when that is 0, as under Trainer(barebones=True)).
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss_and_logits(batch)
        images, labels = batch
        self.val_acc.update(logits, labels)
        self.val_loss_mean.update(loss, weight=len(labels))
        self.val_confusion.update(logits, labels)
        if batch_idx == 0:
            # The validation loader never shuffles, so its first batch holds the same images every
            # epoch, and TensorBoard's slider shows the guesses for them change as the model learns.
            self.grid_batch = (images[:GRID_IMAGES], logits[:GRID_IMAGES].argmax(dim=1), labels[:GRID_IMAGES])

    def on_validation_epoch_end(self) -> None:
        # Lightning 2.x removed the video's `validation_epoch_end(outputs)`: instead of
        # stacking every step's output, a metric accumulates as the steps run, weighted
        # by batch size; compute() also gathers it across DDP processes.
        avg_val_loss = self.val_loss_mean.compute()
        # val_loss is the same number under the name Lightning's examples use. compute() made
        # each value equal on every process, so sync_dist=True leaves it as it is.
        metrics = {"val_loss": avg_val_loss, "val_acc": self.val_acc.compute()}
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        self.log("avg_val_loss", avg_val_loss, sync_dist=True)
        confusion = self.val_confusion.compute()  # every process takes part, as it gathers the counts
        for metric in (self.val_loss_mean, self.val_acc, self.val_confusion):
            metric.reset()
        # Pictures in TensorBoard's Images tab, whose slider steps through the epochs: drawn by one
        # process, and not for the sanity check of a few batches that Lightning runs before training.
        if (
            isinstance(self.logger, TensorBoardLogger)
            and self.trainer.is_global_zero
            and not self.trainer.sanity_checking
        ):
            tensorboard = self.logger.experiment  # torch's SummaryWriter
            tensorboard.add_image("val_predictions", predictions_grid(*self.grid_batch), self.current_epoch)
            # matplotlib's Figure, not pyplot: nothing is shown, no GUI backend is loaded, nothing needs closing.
            figure = Figure(figsize=(6, 6))
            self.val_confusion.plot(confusion, ax=figure.add_subplot())
            tensorboard.add_figure("val_confusion_matrix", figure, self.current_epoch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss_and_logits(batch)
        labels = batch[1]
        self.test_acc.update(logits, labels)
        self.test_loss_mean.update(loss, weight=len(labels))

    def on_test_epoch_end(self) -> None:
        metrics = {"test_loss": self.test_loss_mean.compute(), "test_acc": self.test_acc.compute()}
        self.log_dict(metrics, sync_dist=True)
        for metric in (self.test_loss_mean, self.test_acc):
            metric.reset()

    def on_test_end(self) -> None:
        # TensorBoard's HParams tab: one row per run, its hyperparameters beside the accuracy of the
        # weights tested, on the validation images (the best epoch's, which chose them) and the test images.
        best_val_acc = self.trainer.checkpoint_callback.best_model_score
        if isinstance(self.logger, TensorBoardLogger) and best_val_acc is not None:
            metrics = {"hp/val_acc": best_val_acc, "hp/test_acc": self.trainer.callback_metrics["test_acc"]}
            self.logger.log_hyperparams(self.hparams, metrics, step=self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The fused kernel updates all parameters at once: about a quarter faster per
        # step on CPU. TPUs (XLA) have none, and Lightning cannot clip the gradients of
        # a fused optimizer under mixed precision.
        clips_mixed = self.trainer.gradient_clip_val and self.trainer.precision.endswith("mixed")
        fused = self.device.type in ("cpu", "cuda", "mps") and not clips_mixed
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate, fused=fused)

    def prepare_data(self) -> None:
        # Lightning calls this once per machine, so several processes never download
        # into the same folder at once.
        if mnist_files_present(self.hparams.data_dir):
            return
        try:
            for train in (True, False):
                MNIST(self.hparams.data_dir, train=train, download=True)
        except Exception as error:  # no network, a proxy, a full disk, ...
            files = ", ".join(Path(name).stem for name, _ in MNIST.resources)
            raise DataError(
                f"MNIST is not in {Path(self.hparams.data_dir).resolve()} and could not be "
                f"downloaded ({error}). Put the four MNIST files ({files}, each optionally "
                f".gz) into {Path(self.hparams.data_dir, 'MNIST', 'raw')}, or point --data-dir "
                "at the folder that holds MNIST/raw/."
            ) from error

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and not hasattr(self, "mnist_train"):
            full = load_mnist(self.hparams.data_dir, train=True)
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SPLIT_SEED))
            val_size = round(len(full) * VAL_FRACTION)
            val_index, train_index = order.split([val_size, len(full) - val_size])
            self.mnist_train = MNISTTensors(full.images[train_index], full.labels[train_index])
            self.mnist_val = MNISTTensors(full.images[val_index], full.labels[val_index])
        # The test files are read before training too, so that wrong ones stop the run
        # before it trains, not after.
        if stage in ("fit", "test") and not hasattr(self, "mnist_test"):
            self.mnist_test = load_mnist(self.hparams.data_dir, train=False)

    def _dataloader(
        self, dataset: MNISTTensors, shuffle: bool, sampler: DistributedSampler | None = None
    ) -> DataLoader:
        # The video's tip was num_workers=4. Here the data is already in memory and a
        # batch takes microseconds to build, so worker processes would only add the cost
        # of sending every batch between processes: 0 (the main process) is fastest.
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=_batch_as_is,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self.mnist_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # Validation and test never shuffle: Lightning warns if they do, as the video shows.
        return self._dataloader(self.mnist_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        # Under DDP Lightning gives each process a DistributedSampler, which repeats a few
        # images when the test set does not split evenly, and the accuracy would count them
        # twice. Lightning's unrepeated sampler gives each process its own share instead,
        # so the accuracy, synced across processes, counts every test image exactly once.
        sampler = UnrepeatedDistributedSampler(self.mnist_test, shuffle=False) if dist.is_initialized() else None
        return self._dataloader(self.mnist_test, shuffle=False, sampler=sampler)


## Command line: every Trainer feature the video shows, as a flag


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


def _batch_limit(text: str) -> int | float:
    """A number of batches (an integer) or a fraction of them (a float in (0, 1])."""
    if text.isdigit():
        return _positive_int(text)
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a batch count or a fraction in (0, 1], got {text}")
    return value


def _precision(text: str) -> str:
    # Lightning 2.x names precisions "32-true", "16-mixed", ...; the video's 16 means 16-mixed.
    value = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(text, text)
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(PRECISIONS)} (or 16), got {text}")
    return value


def _devices(text: str) -> int | str:
    """ "auto", a number of devices, or a comma-separated list of device indices."""
    if text == "auto" or all(part.strip().isdigit() for part in text.split(",") if part):
        return int(text) if text.isdigit() else text
    raise argparse.ArgumentTypeError(f'must be "auto", a number or a list like 0,1, got {text}')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; each default is set here once and shown by --help."""
    parser = argparse.ArgumentParser(
        description="Train the tutorial's feed-forward MNIST classifier with PyTorch Lightning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model and data")
    model.add_argument("--hidden-size", type=_positive_int, default=500, help="units in the hidden layer")
    model.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    model.add_argument("--batch-size", type=_positive_int, default=100, help="images per batch")
    model.add_argument(
        "--data-dir", default="./data", help="folder holding MNIST/raw/; MNIST is downloaded there if absent"
    )
    model.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=0,
        help="DataLoader worker processes; 0 is fastest for in-memory tensors",
    )

    trainer = parser.add_argument_group("Trainer")
    trainer.add_argument(
        "--fast-dev-run",
        type=_non_negative_int,
        nargs="?",
        const=1,
        default=0,
        help="run N batches (1 if N is left out) of training, validation and test, to check the code",
    )
    trainer.add_argument("--max-epochs", type=_positive_int, default=2, help="passes over the training set")
    trainer.add_argument(
        "--gpus",
        type=_positive_int,
        default=None,
        help="the video's Trainer(gpus=N): the same as --accelerator gpu --devices N",
    )
    trainer.add_argument(
        "--accelerator",
        choices=("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
        default="auto",
        help="hardware to train on",
    )
    trainer.add_argument(
        "--devices", type=_devices, default="auto", help="number of devices (or a list like 0,1) per machine"
    )
    trainer.add_argument("--strategy", default="auto", help="how to spread training over devices, e.g. ddp")
    trainer.add_argument(
        "--num-nodes", type=_positive_int, default=1, help="machines taking part in distributed training"
    )
    trainer.add_argument(
        "--precision", type=_precision, default="32-true", help=f"one of {', '.join(PRECISIONS)}; 16 means 16-mixed"
    )
    trainer.add_argument(
        "--lr-find",
        action="store_true",
        help="run Lightning's learning-rate finder first and train with its suggestion",
    )
    trainer.add_argument(
        "--deterministic", action="store_true", help="use deterministic algorithms only, for bit-identical reruns"
    )
    trainer.add_argument("--seed", type=int, default=42, help="seed for weights and shuffling")
    trainer.add_argument(
        "--gradient-clip-val", type=_non_negative_float, default=None, help="clip the gradient norm to this value"
    )
    trainer.add_argument(
        "--limit-train-batches",
        type=_batch_limit,
        default=None,
        help="training batches per epoch: a count or a fraction (all if not given)",
    )
    trainer.add_argument(
        "--limit-val-batches",
        type=_batch_limit,
        default=None,
        help="validation batches per epoch: a count or a fraction (all if not given)",
    )
    trainer.add_argument("--ckpt-path", default=None, help="checkpoint to resume training from")
    args = parser.parse_args(argv)

    if args.gpus is not None and (args.accelerator != "auto" or args.devices != "auto"):
        parser.error("--gpus N already means --accelerator gpu --devices N; give one or the other")
    if args.ckpt_path is not None and not Path(args.ckpt_path).is_file():
        parser.error(f"--ckpt-path: no checkpoint file at {args.ckpt_path}")
    return args


class ExclusiveTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger, with a version_N folder of its own for every run."""

    def _get_next_version(self) -> int:
        # Lightning takes the highest version_N it finds, plus one, so two runs started
        # together in one folder can take the same version_N and overwrite each other's
        # checkpoints. A mkdir either creates the folder or fails, atomically: the run
        # whose mkdir succeeds owns it. Only global rank 0 claims one; the other DDP
        # processes write nothing, and ModelCheckpoint uses the folder of rank 0.
        version = super()._get_next_version()
        if rank_zero_only.rank != 0:
            return version
        while True:
            try:
                Path(self.root_dir, f"version_{version}").mkdir(parents=True)
                return version
            except FileExistsError:
                version += 1


def build_trainer(args: argparse.Namespace) -> pl.Trainer:
    """A Trainer configured by the command line, checkpointing the best epoch by val_acc."""
    # The video's Trainer(gpus=N) is gone in Lightning 2.x: accelerator="gpu", devices=N.
    accelerator, devices = ("gpu", args.gpus) if args.gpus else (args.accelerator, args.devices)
    best = ModelCheckpoint(monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.4f}")
    # Lightning 2.6 rewrites save_last=True's last.ckpt only when val_acc improves, so a
    # second checkpoint holds the latest epoch, to resume from. When Ctrl-C or SIGTERM
    # stops training, Lightning saves it there and then, in the middle of the epoch.
    last = ModelCheckpoint(filename="last", enable_version_counter=False, save_on_exception=True)
    # The HParams tab gets the accuracies logged by on_test_end instead of a placeholder "hp_metric".
    logger = ExclusiveTensorBoardLogger(save_dir=Path.cwd(), default_hp_metric=False)
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
        callbacks=[best, last, TQDMProgressBar(refresh_rate=LOG_EVERY_N_STEPS)],
        logger=logger,
    )


def _fail(message: str) -> int:
    """Report a problem the user can fix, without a traceback; the exit status is 1."""
    print(f"error: {message}", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    """Train, validate and test; print the test accuracy and the best checkpoint."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True)
    model = LitNeuralNet(
        hidden_size=args.hidden_size,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        num_workers=args.num_workers,
    )
    try:
        trainer = build_trainer(args)
    except (MisconfigurationException, ValueError) as error:
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
            if lr_finder and trainer.is_global_zero and isinstance(trainer.logger, TensorBoardLogger):
                # The loss at each learning rate tried, the suggestion marked with a red dot.
                figure = Figure()
                lr_finder.plot(suggest=True, ax=figure.add_subplot())
                figure.savefig(Path(trainer.logger.log_dir, "lr_find.png"))  # the logger made the folder
                trainer.logger.experiment.add_figure("lr_find", figure)
        trainer.fit(model, ckpt_path=args.ckpt_path)
        # Test once, with the weights that validated best (fast_dev_run saves no checkpoint).
        # The path, rather than ckpt_path="best", says which of the two checkpoints is meant.
        best_path = None if args.fast_dev_run else trainer.checkpoint_callback.best_model_path
        results = trainer.test(model, ckpt_path=best_path)
    except (DataError, MisconfigurationException) as error:  # a setting that does not fit the data, say
        return _fail(str(error))
    except SystemExit:
        # Lightning stops a run on Ctrl-C or SIGTERM with SystemExit, after saving last.ckpt.
        if not trainer.interrupted:
            raise
        return _report_interruption(trainer, argv)
    if trainer.is_global_zero:
        print(f"Test accuracy: {100 * results[0]['test_acc']:.2f}%")
        print(f"Best checkpoint: {trainer.checkpoint_callback.best_model_path or '(none: fast_dev_run saves none)'}")
        if isinstance(trainer.logger, TensorBoardLogger):  # fast_dev_run has none
            print(f"Run folder: {trainer.logger.log_dir}")
            print(f"Open it in TensorBoard: tensorboard --logdir {shlex.quote(trainer.logger.log_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
