"""A user's mistake or the machine's fault ends in one `error:` line and a non-zero exit, never a
traceback, while a bug of the script keeps its traceback; nothing on disk is lost and nothing
stray is left behind."""

import errno
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from conftest import (
    errors_of,
    fails,
    nothing_stray,
    reported_accuracy,
    run_script,
)

from lightning_mnist import LitNeuralNet, build_trainer, main, parse_args
from mnist_kit.command_line import is_problem
from mnist_kit.errors import RunError

## Checkpoint files that --ckpt-path cannot use


def write_object_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {}, "hyper_parameters": {}, "trainer": pl.Trainer}, path)  # a class: not a plain value


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda path, good: path.write_bytes(b""), "is empty"),
        (lambda path, good: path.write_bytes(good.read_bytes()[: good.stat().st_size // 2]), "is cut short or damaged"),
        (lambda path, good: path.write_bytes(os.urandom(5000)), "is not a PyTorch checkpoint"),
        (lambda path, good: torch.save(LitNeuralNet().state_dict(), path), "is not a checkpoint of this script"),
        (lambda path, good: write_object_checkpoint(path), "holds Python objects besides tensors and plain values"),
        (
            lambda path, good: torch.save(
                {**torch.load(good, weights_only=True), "hyper_parameters": {**LitNeuralNet(hidden_size=32).hparams}},
                path,
            ),
            "holds weights that do not fit its own hyperparameters",
        ),
    ],
    ids=["empty", "truncated", "random bytes", "a state_dict", "python objects", "another architecture"],
)
def test_a_checkpoint_that_cannot_be_used_is_named_with_what_is_wrong(
    make, problem, finished_run, tiny_mnist, in_tmp_path, capsys
):
    bad = in_tmp_path / "bad.ckpt"
    make(bad, finished_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--ckpt-path", str(bad))
    assert error.startswith(f"error: {bad} {problem}") and "weights_only" not in error
    assert not (in_tmp_path / "lightning_logs").exists() or not list((in_tmp_path / "lightning_logs").iterdir())


## The file system


def test_lightning_logs_as_a_plain_file_is_reported_and_kept(tiny_mnist, in_tmp_path, capsys):
    (in_tmp_path / "lightning_logs").write_text("notes")
    error = fails(capsys, "--data-dir", str(tiny_mnist))
    assert (
        error == f"error: {in_tmp_path / 'lightning_logs'} is a file, where this script keeps its runs: move it away."
    )
    assert (in_tmp_path / "lightning_logs").read_text() == "notes"


def test_lightning_logs_as_a_dangling_link_is_reported_at_once(tiny_mnist, in_tmp_path, capsys):
    (in_tmp_path / "lightning_logs").symlink_to(in_tmp_path / "unmounted" / "logs")
    started = time.monotonic()
    error = fails(capsys, "--data-dir", str(tiny_mnist))
    assert time.monotonic() - started < 30
    assert error.startswith(
        f"error: {in_tmp_path / 'lightning_logs'} links to {in_tmp_path / 'unmounted' / 'logs'}, which"
    )


def test_a_working_folder_that_cannot_be_written_is_reported(tiny_mnist, in_tmp_path, capsys, monkeypatch):
    # Root may write anywhere, so the refusal is made here as the file system makes it.
    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(Path, "mkdir", refuse)
    error = fails(capsys, "--data-dir", str(tiny_mnist))
    assert error == f"error: Permission denied: {in_tmp_path / 'lightning_logs'}. Run it in a folder you can write to."


class FullDisk:
    """torch.save that writes part of the checkpoint and then fails as a full disk does, from its Nth call on."""

    def __init__(self, from_call: int) -> None:
        self.calls, self.from_call, self.save = 0, from_call, torch.save

    def __call__(self, checkpoint, file) -> None:
        self.calls += 1
        if self.calls < self.from_call:
            return self.save(checkpoint, file)
        file.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_checkpoint_write_that_fails_part_way_keeps_the_previous_checkpoint_whole(
    tiny_mnist, in_tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(torch, "save", FullDisk(from_call=3))  # epoch 0 saves the best and the last checkpoint
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--max-epochs", "2")
    checkpoints = in_tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert error.startswith(f"error: could not write the checkpoint {checkpoints}")
    assert ": No space left on device, with " in error and "The checkpoints written before are whole." in error
    for name in ("last.ckpt", "epoch=0-val_acc=1.0000.ckpt"):
        checkpoint = torch.load(checkpoints / name, weights_only=True)
        assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 6
    nothing_stray(in_tmp_path)


## Launching


def test_num_nodes_without_a_launcher_is_refused_rather_than_waited_for(tiny_mnist, tmp_path):
    result = run_script("--data-dir", str(tiny_mnist), "--num-nodes", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: --num-nodes 2 needs the script started on each machine by a launcher")
    assert "torchrun" in error and "srun" in error
    assert not list(tmp_path.glob("lightning_logs/*"))


def test_more_cpu_processes_than_cores_are_refused(in_tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    message = "--devices 3 on the CPU starts 3 training processes, but this machine has 2 CPU cores: use --devices 2"
    with pytest.raises(RunError, match=re.escape(message)):  # from the Trainer, before main would start them
        build_trainer(parse_args(["--accelerator", "cpu", "--devices", "3"]))
    assert not list(in_tmp_path.glob("lightning_logs/*"))


## Values


def test_a_model_too_large_for_the_memory_is_refused_before_it_is_made(tiny_mnist, in_tmp_path, capsys):
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--hidden-size", "100000000")
    assert error.startswith("error: a model with --hidden-size 100000000 has 79,500,000,010 weights and needs about")
    assert "use a smaller one" in error


def test_a_run_whose_weights_become_nan_reports_no_accuracy(tiny_mnist, in_tmp_path, capsys):
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--lr", "1e30", "--max-epochs", "3")
    assert re.match(r"error: the weights became NaN or infinite by step \d+: the model diverged", error)
    assert error.endswith("Try a smaller --lr than 1e+30.")


## The data files


## Resuming: the same run, with the same hyperparameters


def test_a_flag_that_contradicts_the_checkpoint_is_refused_with_both_values(
    finished_run, tiny_mnist, in_tmp_path, capsys
):
    last = finished_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--ckpt-path", str(last), "--lr", "0.5")
    assert error == (
        "error: --lr 0.5 contradicts the checkpoint, whose run used --lr 0.001: leave --lr out to continue "
        "that run, or leave --ckpt-path out to start a new one."
    )
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--ckpt-path", str(last), "--hidden-size", "32")
    assert error.startswith("error: --hidden-size 32 contradicts the checkpoint, whose run used --hidden-size 500")


def test_a_checkpoint_whose_run_folder_is_gone_still_resumes_and_tests(finished_run, tiny_mnist, in_tmp_path, capsys):
    copy = in_tmp_path / "copy" / "kept.ckpt"
    copy.parent.mkdir()
    shutil.copy(finished_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", copy)
    gone = in_tmp_path / "gone"  # a run folder that no longer exists: its best checkpoint is gone too
    checkpoint = torch.load(copy, weights_only=True)
    for state in checkpoint["callbacks"].values():
        state["best_model_path"] = str(gone / "checkpoints" / "epoch=0-val_acc=1.0000.ckpt")
        state["dirpath"] = str(gone / "checkpoints")
    torch.save(checkpoint, copy)
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "1", "--ckpt-path", str(copy)]) == 0
    out, err = capsys.readouterr()
    assert f"The run's best checkpoint is not beside {copy}: testing that checkpoint's weights." in err
    assert reported_accuracy(out) >= 90.0


## Interruptions, in every phase


## DDP: one report, no traceback from the other process, no process left behind


## A bug of the script keeps its traceback


BUGS = [
    ZeroDivisionError("division by zero"),
    RuntimeError("mat1 and mat2 shapes differ"),
    AttributeError("'NoneType' object has no attribute 'shape'"),
    TypeError("forward() takes 2 positional arguments but 3 were given"),
    KeyError("val_loss"),
    IndexError("list index out of range"),
    ValueError("too many values to unpack"),
]


@pytest.mark.parametrize("bug", BUGS, ids=type)
def test_no_class_of_bug_is_taken_for_a_users_mistake(bug):
    assert not is_problem(bug)


@pytest.mark.parametrize("bug", BUGS[:3], ids=type)
def test_a_bug_of_the_script_is_not_turned_into_an_error_line(bug, tiny_mnist, in_tmp_path, monkeypatch):
    def training_step(self, batch, batch_idx):
        raise bug

    monkeypatch.setattr(LitNeuralNet, "training_step", training_step)
    with pytest.raises(type(bug), match=str(bug)):
        main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"])


@pytest.mark.parametrize(
    "fault",
    [
        dist.DistError("Connection closed by peer"),  # a DDP peer lost
        dist.DistNetworkError("Connection reset by peer"),
        dist.DistStoreError("Timed out waiting for clients"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
    ids=type,
)
def test_a_fault_of_the_environment_in_training_ends_in_one_error_line(
    fault, tiny_mnist, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)

    def fit(*args, **kwargs):
        raise fault

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"]) == 1
    out, err = capsys.readouterr()
    errors = errors_of(err)
    assert len(errors) == 1 and str(fault).split(".")[0] in errors[0]
    assert "Test accuracy" not in out


def test_a_bug_in_training_keeps_its_traceback(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def fit(*args, **kwargs):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    with pytest.raises(ValueError, match="a bug of ours"):
        main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"])
