"""Checkpoints: written whole or not at all, the best one found by what each stores, a continued
run's state restored wherever its folder has moved, and a checkpoint's hyperparameters checked."""

import argparse
import errno
import inspect
import io
import logging
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only

from mnist_kit.errors import RunError, shown
from mnist_kit.files import memory_size, read_whole
from mnist_kit.flags import CHECKPOINT_FLAGS
from mnist_kit.stopping import Diverged, all_finite


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

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Only while training: a stop in the final test would save the best epoch's weights,
        # which the test runs with, as the last.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_exception(trainer, pl_module, exception)

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


def read_checkpoint(path: str, model_class: type[pl.LightningModule]) -> dict:
    """The hyperparameters of a checkpoint of model_class, or a RunError that says what the file is instead."""
    advice = "give --ckpt-path a last.ckpt or best checkpoint of a run of this script."
    content = read_whole(path, advice.capitalize(), memory_size())  # larger than the memory, it could not be read
    start = content[:4]
    if start != b"PK\x03\x04":  # torch.save writes a zip archive
        raise RunError(f"{shown(path)} {'is empty' if not start else 'is not a PyTorch checkpoint'}: {advice}")
    try:
        # weights_only: a checkpoint holds tensors and plain values; anything else could run code.
        checkpoint = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged archive fails in many ways
        problem = "is cut short or damaged"
        if "Weights only load failed" in str(error):  # torch's refusal of anything but tensors and plain values
            problem = "holds Python objects besides tensors and plain values, as this script's checkpoints never do"
        raise RunError(f"{shown(path)} {problem}: {advice}") from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not CHECKPOINT_FLAGS.keys() <= hparams.keys():
        raise RunError(
            f"{shown(path)} is not a checkpoint of this script (no {model_class.__name__} hyperparameters: weights saved with "
            "torch.save, say): give --ckpt-path a last.ckpt or best checkpoint of a run of this script."
        )
    # Each of the model's arguments, of its default's type; older checkpoints may lack some.
    arguments = inspect.signature(model_class).parameters
    unknown = [
        name
        for name, value in hparams.items()
        if name not in arguments or type(value) is not type(arguments[name].default)
    ]
    if unknown:
        raise RunError(
            f"{shown(path)} holds hyperparameters that {model_class.__name__} does not take "
            f"({shown(', '.join(map(str, unknown)))}, by name or type): it is damaged, or from another version "
            "of this script."
        )
    try:
        with torch.device("meta"):  # the shapes of the weights these hyperparameters make, with no memory for them
            expected = {name: value.shape for name, value in model_class(**hparams).state_dict().items()}
    except (RuntimeError, ValueError) as error:  # sizes that make no weights (below 1), or fewer than 2 classes
        raise RunError(f"{shown(path)} holds hyperparameters that make no model: it is damaged.") from error
    found = {name: value.shape for name, value in checkpoint.get("state_dict", {}).items()}
    if found != expected:
        raise RunError(
            f"{shown(path)} holds weights that do not fit its own hyperparameters: it is damaged or not from "
            "this script."
        )
    return hparams


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
