"""The callbacks that stop a run: StopOnSignal, at the end of a step, and StopWhenDiverged, when
the weights stop being numbers; neither lets a checkpoint of NaN weights be saved or used."""

from collections.abc import Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch

from mnist_kit.errors import RunError, shown
from mnist_kit.signals import Stopped, note_stop_signals, noted_signal


class StopOnSignal(pl.Callback):
    """The stop points in Lightning's loops: where every process of a run agrees on a stop signal
    that any of them noted, and all stop together. Lightning saves the step in last.ckpt."""

    # The points: before the first training step (a signal during set-up), after each training
    # step (under DDP, after every 10th, where the processes talk anyway), after the last
    # validation, and after the final test. Lightning 2.6 handles SIGTERM itself, but under DDP
    # its handler talks to the other processes from inside the signal handler, which can
    # deadlock them (Lightning issue #20806), and Ctrl-C stops each process wherever it is: so
    # the stop signals are noted (signals.py) from Lightning's first hook after it set its own.
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        note_stop_signals()

    def on_train_start(self, trainer, pl_module) -> None:
        note_stop_signals()
        self._stop_if_signalled(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size == 1 or trainer.global_step % trainer.log_every_n_steps == 0:
            self._stop_if_signalled(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:  # a signal in the last validation
        self._stop_if_signalled(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        note_stop_signals()

    def on_test_end(self, trainer, pl_module) -> None:  # the test, under a second, runs to its end
        self._stop_if_signalled(trainer)

    @staticmethod
    def _stop_if_signalled(trainer: pl.Trainer) -> None:
        signum = noted_signal() or 0
        if trainer.world_size > 1:  # each process may have had another signal, or none: all stop with the highest
            signum = int(
                trainer.strategy.reduce(torch.tensor(signum, device=trainer.strategy.root_device), reduce_op="max")
            )
        if signum:
            raise Stopped(signum)  # Lightning saves last.ckpt, then passes it on to main()


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
