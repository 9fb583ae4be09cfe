"""MNIST digit classification with PyTorch Lightning 2.x: the feed-forward net (784 -> 500 ->
ReLU -> 10) of the "convert your PyTorch model to Lightning" tutorial, on the current API.
It trains on 55,000 MNIST images, validates on the other 5,000 training images, and tests
once on the 10,000 test images with the checkpoint that validated best.

    python lightning_mnist.py                  # 2 epochs: about 97.3% test accuracy
    python lightning_mnist.py --fast-dev-run   # one batch through every step, to check the code
    python lightning_mnist.py --predict 7.png  # the digit in your own picture, read by the best checkpoint
    tensorboard --logdir lightning_logs        # the curves, the mistakes, the hyperparameters

This file is the lesson: the model, its Trainer, fit and test. What a real run needs around
them (data files, checkpoints, stop signals, pictures, the command line) is in mnist_kit/,
one module per concern. Where Lightning 2.x differs from the video, a comment says so.
"""

import sys

from mnist_kit.flags import answer_before_imports, flag_parser

# The video's hyperparameters; each is the default of a command-line flag (python lightning_mnist.py --help).
INPUT_SIZE = 28 * 28  # MNIST images are 28x28 pixels, flattened
HIDDEN_SIZE = 500
NUM_CLASSES = 10  # the digits 0-9
NUM_EPOCHS = 2
BATCH_SIZE = 100
LEARNING_RATE = 0.001
parse_args = flag_parser(HIDDEN_SIZE, LEARNING_RATE, BATCH_SIZE, NUM_EPOCHS)

if __name__ == "__main__":
    # --help, or a mistake in the flags, is answered now: importing torch and Lightning takes seconds.
    answer_before_imports(sys.argv[1:], parse_args)

import argparse
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist_kit import command_line
from mnist_kit.checkpoints import AtomicCheckpointIO, RunCheckpoint, checkpoint_to_test, newest_best_checkpoint
from mnist_kit.data import download_mnist, load_mnist, load_mnist_train_and_val, mnist_loader
from mnist_kit.digits import prepare_digit
from mnist_kit.flags import flags_to_argv
from mnist_kit.lr_finder import find_learning_rate
from mnist_kit.pictures import ValidationPictures
from mnist_kit.report import report_results
from mnist_kit.runs import check_launch, model_arguments, note_precision, progress_bar, refusals_explained, run_logger
from mnist_kit.stopping import StopOnSignal, StopWhenDiverged

__all__ = ["LitNeuralNet", "newest_best_checkpoint", "prepare_digit", "train_and_test"]  # the README's examples


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
        # mnist_kit's prepare_digit): each picture's probability of being each digit.
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


## The video's `__main__` part, as functions a notebook can call


class Result(NamedTuple):
    """What train_and_test returns. Without logs (fast_dev_run) there is no checkpoint and no run folder."""

    test_acc: float  # on the 10,000 test images, of the checkpoint that validated best
    best_checkpoint: str | None  # its path, for LitNeuralNet.load_from_checkpoint
    run_folder: str | None  # lightning_logs/version_N, for tensorboard --logdir


def train_and_test(args: argparse.Namespace | None = None, run: dict | None = None, **flags) -> Result:
    """Train, validate and test once, as `python lightning_mnist.py` does:
    train_and_test(max_epochs=2, fast_dev_run=False, gpus=None). The keywords are the command
    line's flags, dashes as underscores (lr for --lr), and are checked as the command line is."""
    args = args or parse_args(flags_to_argv(flags, parse_args))
    run = {} if run is None else run  # where main() follows the run, to say where a signal stopped it
    pl.seed_everything(args.seed, workers=True)
    # The video: model = LitNeuralNet(input_size, hidden_size, num_classes)
    model = LitNeuralNet(**model_arguments(args, LitNeuralNet))
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
    # Beyond the video: one test, on images no epoch has seen, with the weights that validated best.
    run["phase"] = "the final test"
    best_checkpoint = checkpoint_to_test(trainer, args)
    test_acc = trainer.test(model, ckpt_path=best_checkpoint)[0]["test_acc"]
    if rank_zero_only.rank == 0:
        report_results(trainer, model, args, test_acc, best_checkpoint)
    return Result(test_acc, best_checkpoint, run_folder)


LOG_EVERY_N_STEPS = 10  # train_loss to TensorBoard and the progress bar: 110 points in a default run


def build_trainer(args: argparse.Namespace) -> pl.Trainer:
    """A Trainer configured by the command line, checkpointing the best epoch by val_acc."""
    # The video's Trainer(gpus=N) is gone in Lightning 2.x: accelerator="gpu", devices=N.
    accelerator, devices = ("gpu", args.gpus) if args.gpus else (args.accelerator, args.devices)
    # The best epoch by val_acc, which the final test uses; the video's Lightning saved the
    # latest epoch instead.
    best = RunCheckpoint(monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.4f}")
    # The latest epoch, to resume from. Lightning 2.6 rewrites save_last=True's last.ckpt only
    # when val_acc improves, so a second checkpoint holds it. When a stop signal stops
    # training, Lightning saves it there and then, in the middle of the epoch.
    last = RunCheckpoint(filename="last", enable_version_counter=False, save_on_exception=True)
    logger = None if args.fast_dev_run else run_logger(args.ckpt_path)  # fast_dev_run logs and saves nothing
    with refusals_explained(accelerator, logger):  # a value Lightning refuses ends the run in one line
        trainer = pl.Trainer(
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
                ValidationPictures(NUM_CLASSES),  # TensorBoard's Images tab
                StopWhenDiverged(),  # no NaN weights validated, saved or tested
                StopOnSignal(),  # Ctrl-C, SIGTERM, SIGHUP: every process stops after the same step, and saves it
                # Redrawing the bar at every step of a fast net costs more than the step itself.
                progress_bar(LOG_EVERY_N_STEPS),
            ],
            logger=logger or False,
            plugins=[AtomicCheckpointIO()],  # checkpoints written whole, or not at all
            # Anything else a run writes (the learning-rate finder's temporary checkpoint) goes in its folder.
            default_root_dir=logger.log_dir if logger else None,
        )
        check_launch(trainer)  # no run that would wait forever, or start more processes than cores
    note_precision(trainer, args)
    return trainer


def main(argv: list[str] | None = None) -> int:
    """`python lightning_mnist.py`: train and test, or --predict; the exit status says how it ended
    (mnist_kit/command_line.py: a mistake ends in one `error:` line, a stop signal in a report)."""
    return command_line.main(argv, parse_args, train_and_test, LitNeuralNet)


if __name__ == "__main__":
    sys.exit(main())
