"""The learning-rate finder (--lr-find): Lightning's range test, read with fast.ai's rule."""

import math
import sys
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only
from torchvision.transforms.functional import to_pil_image

from mnist_kit.pictures import lr_find_picture

LR_FINDER_SMOOTHING = 0.9  # each point of the finder's loss curve is 0.9 of the one before and 0.1 of its step's loss


def find_learning_rate(trainer: pl.Trainer, model: pl.LightningModule) -> None:
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
    smoothed, suggestion = suggested_rate(rates, losses)
    # Every DDP process ran its own test on its own batches: all train with rank 0's rate.
    suggestion = trainer.strategy.broadcast(suggestion)
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


def suggested_rate(rates: list[float], losses: list[float]) -> tuple[list[float], float]:
    """The finder's loss curve smoothed over about 10 steps, and a tenth of the rate at its lowest point."""
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
    return smoothed, rates[lowest] / 10


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
