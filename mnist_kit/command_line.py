"""The command line's run: main(), which trains and tests or reads pictures (--predict), and its
boundary: a mistake or a fault of the machine ends in one `error:` line, a stop signal in a report."""

import argparse
import contextlib
import errno
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from torch.utils.data import DataLoader

from mnist_kit.checkpoints import newest_best_checkpoint, read_checkpoint
from mnist_kit.digits import PictureError, doubts, prepare_digit
from mnist_kit.errors import RunError, shown
from mnist_kit.flags import working_folder_problem
from mnist_kit.report import answer, report_interruption
from mnist_kit.runs import discard_unused_run_folder, filter_warnings, lightning_trainer
from mnist_kit.signals import (
    STOP_SIGNALS,
    Stopped,
    forget_noted,
    note_stop_signals,
    started_by_a_launcher,
    stop_if_noted,
)
from mnist_kit.stopping import refuse_diverged


def main(
    argv: list[str] | None,
    parse_args: Callable[[list[str]], argparse.Namespace],
    train_and_test: Callable[[argparse.Namespace, dict], object],
    model_class: type[pl.LightningModule],
) -> int:
    """Train, validate and test with train_and_test, which prints the test accuracy and the best
    checkpoint; or, with --predict, read the digits in pictures with a model_class checkpoint. The
    exit status is 0 when done, 1 after a problem that one `error:` line explains, 2 for a flag that
    the command line refuses, and 128 + the signal's number after a stop signal: 130 after Ctrl-C,
    143 after SIGTERM, 129 after SIGHUP."""
    argv = sys.argv[1:] if argv is None else argv
    script = inspect.getfile(train_and_test)  # the lesson, whose command continues a stopped run
    args = parse_args(argv)
    run = {"trainer": None, "folder": None, "phase": "set-up"}  # train_and_test fills it in as it goes
    # A stop signal is noted, and the run stops at the next stop point (signals.py); the first is
    # here, for a signal during the imports (noted since answer_before_imports) and the checks,
    # unless the run's other processes would wait for this one: then it is StopOnSignal's first.
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    note_stop_signals()
    stdout = sys.stdout
    try:
        filter_warnings()
        check_streams()
        sys.stdout = CheckedStdout(stdout)
        problem = working_folder_problem()
        if problem:
            raise RunError(problem)
        if not started_by_a_launcher():
            stop_if_noted()
        if args.predict:
            run["phase"] = "prediction"
            return predict(args, model_class)
        train_and_test(args, run)
        return 0
    except Stopped as stop:
        return report_interruption(stop.signal, run, args, argv, script)
    except ProcessExitedException as stop:  # --strategy ddp_spawn: its processes stopped as above, or died
        if stop.exit_code - 128 in STOP_SIGNALS:
            stopped_by = signal.Signals(stop.exit_code - 128)
            return report_interruption(stopped_by, run, args, argv, script, spawned=True)
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
        forget_noted()
        if dist.is_initialized():
            # Lightning keeps DDP's process group for the next fit or test; this run is done with it.
            # Left to the end of the process, its teardown can race with the other processes'.
            dist.destroy_process_group()


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


def predict(args: argparse.Namespace, model_class: type[pl.LightningModule]) -> int:
    """--predict: print the digit each picture shows, as a model_class checkpoint reads it, a line per
    picture in the order given; the exit status is 1 when a picture could not be read."""
    checkpoint = args.ckpt_path or newest_best_checkpoint(Path("lightning_logs"))
    if checkpoint is None:
        raise RunError(
            "no checkpoint in ./lightning_logs to predict with: train one first (python lightning_mnist.py), "
            "or pass --ckpt-path"
        )
    read_checkpoint(checkpoint, model_class)  # one line for a damaged file or another model's, never torch's own words
    model = model_class.load_from_checkpoint(checkpoint, map_location="cpu")
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


def predict_pictures(args: argparse.Namespace, model: pl.LightningModule, accelerator: str, devices: int | str) -> int:
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
        stop_if_noted()  # between pictures
        try:
            images.append(prepare_digit(path))
            paths.append(path)
        except PictureError as error:  # say which, and go on with the others
            status = report_problem(RunError(f"{shown(path)}: {error}"))
    if images:
        batches = trainer.predict(
            model, DataLoader(torch.stack(images), batch_size=args.batch_size or model.hparams.batch_size)
        )
        stop_if_noted()
        for path, probabilities, image in zip(paths, torch.cat(batches), images, strict=True):
            (first, second), (digit, runner_up) = (top.tolist() for top in probabilities.topk(2))
            reasons = doubts(probabilities, image)  # on the same line, so that each picture keeps one
            unsure = f"; unsure: {', '.join(reasons)}" if reasons else ""
            answer(f"{shown(path)}: {digit} ({100 * first:.1f}%; next {runner_up} at {100 * second:.1f}%){unsure}")
    return status
