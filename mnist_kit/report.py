"""What a run reports: its results on stdout and in TensorBoard's HParams tab, and where a stop
signal stopped it, with the command that continues it, on stderr."""

import argparse
import shlex
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams

from mnist_kit.errors import shown
from mnist_kit.flags import rerun_command, resume_command
from mnist_kit.runs import discard_unused_run_folder


def answer(line: str) -> None:
    """Print a result on stdout, at once: if it cannot be written there, CheckedStdout says so while main() runs."""
    print(line, flush=True)


def report_results(
    trainer: pl.Trainer, model: pl.LightningModule, args: argparse.Namespace, test_acc: float, tested: str | None
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
    stopped_by: signal.Signals,
    run: dict,
    args: argparse.Namespace,
    argv: list[str],
    script: str | Path,
    spawned: bool = False,
) -> int:
    """Say on stderr where a stop signal stopped the run of script with argv, and how to continue it;
    the exit status is 128 + the signal's number, what a shell or a scheduler reports for a process it stopped."""
    if rank_zero_only.rank != 0:
        # Global rank 0 reports and gives the run's exit status. Lightning's launcher kills the
        # whole run, rank 0 before its report, when a process it started exits with another.
        return 0
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
        "training": "after training had finished, before the final test"
        if trainer and trainer.fit_loop.done
        else f"in epoch {epoch} at step {step}"
        if step
        else "before training went on"
        if args.ckpt_path
        else "before the first training step",
        "the final test": "during the final test, after training had finished",
        "prediction": "while predicting",
    }[phase]
    if phase == "prediction":
        then = "Run the same command again."
    elif saved:
        # What the checkpoint holds, from its own data: the step where the run stopped, unless a
        # second signal stopped it at once, or the weights were NaN and were not saved.
        lost = max(step - saved["global_step"], 0) if phase == "training" else 0
        then = f"Continue it with:\n  {resume_command(argv, last, script)}"
        if lost:
            then = f"last.ckpt holds step {saved['global_step']}: the {lost} steps after it are lost. {then}"
    elif args.ckpt_path:
        then = f"Continue it with the same command:\n  {resume_command(argv, args.ckpt_path, script)}"
    else:
        then = f"Nothing to continue: it had saved no checkpoint. Run it again with:\n  {rerun_command(argv, script)}"
        discard_unused_run_folder(folder)
    try:
        # On a line of its own, after the progress bar.
        print(f"\nStopped by {stopped_by.name} {where}. {then}", file=sys.stderr)
    except OSError:  # SIGHUP: the terminal is gone, and with it the reader; last.ckpt is saved all the same
        pass
    return 128 + stopped_by
