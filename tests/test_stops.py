"""Every way a run is asked to stop (Ctrl-C, SIGTERM, SIGHUP; to the process or to its whole group,
with DataLoader workers) ends the same way: last.ckpt saved at the step where it stopped, one
"Stopped by" line on stderr with a command that continues the run, exit 128 + the signal's number,
and no temporary file left. And no weight that is NaN or infinite is ever saved, tested or used."""

import contextlib
import gzip
import io
import math
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Self

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    SCRIPT,
    errors_of,
    fails,
    nothing_stray,
    reported_accuracy,
    run_in,
    run_script,
    trainers_with,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import lightning_mnist
import mnist_kit.command_line
import mnist_kit.data
import mnist_kit.errors
import mnist_kit.signals
from lightning_mnist import LitNeuralNet, main, parse_args
from mnist_kit.checkpoints import AtomicCheckpointIO
from mnist_kit.data import download_mnist
from mnist_kit.flags import resume_command
from mnist_kit.signals import Stopped
from mnist_kit.stopping import StopOnSignal


def no_temporary_file(folder: Path) -> None:
    """Nothing that a write in progress leaves: no .tmp file, hidden or not, anywhere under folder."""
    assert not [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


def finite_checkpoints(folder: Path) -> list[Path]:
    """Every checkpoint under folder, each checked to hold finite weights only."""
    checkpoints = sorted(folder.rglob("*.ckpt"))
    for path in checkpoints:
        weights = torch.load(path, weights_only=True)["state_dict"].values()
        assert all(weight.isfinite().all() for weight in weights), path
    return checkpoints


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory) -> Path:
    """The last.ckpt of a 1-epoch run on the tiny MNIST."""
    folder = run_in(tmp_path_factory.mktemp("trained"), ["--data-dir", str(tiny_mnist), "--max-epochs", "1"])
    return folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


## A signal to a real process, or to its whole group with DataLoader workers


def start(flags: list[str], cwd: Path) -> subprocess.Popen:
    """The script in a process group of its own, as a shell or a scheduler starts it; output to cwd/output.txt."""
    with open(cwd / "output.txt", "w") as output:  # the process has its own copy of the file
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), *flags],
            cwd=cwd, stdout=output, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True, text=True,
        )  # fmt: skip


def wait_for_training(process: subprocess.Popen, cwd: Path) -> None:
    """Until the progress bar shows the 20th training step or later of the first epoch, of 100."""
    deadline = time.monotonic() + 120
    while not re.search(r"Epoch 0: +\d+%.*?\| *[2-9]\d/100", (cwd / "output.txt").read_text()):
        assert process.poll() is None and time.monotonic() < deadline, (cwd / "output.txt").read_text()[-2000:]
        time.sleep(0.05)


STOPPED = re.compile(r"^Stopped by (\w+) in epoch 0 at step (\d+)\. Continue it with:\n  (.+)$", re.MULTILINE)


@pytest.mark.parametrize(
    ("signum", "group", "workers"),
    [(signal.SIGTERM, True, 2), (signal.SIGHUP, True, 2), (signal.SIGINT, False, 0)],
    ids=["SIGTERM to the group, with workers", "SIGHUP to the group, with workers", "SIGINT to the process"],
)
def test_a_signal_saves_the_step_reports_on_stderr_and_the_printed_command_continues(
    signum, group, workers, tiny_mnist, tmp_path
):
    # The progress bar goes to stdout's file here, so that stderr holds the report alone.
    flags = ["--data-dir", str(tiny_mnist), "--num-workers", str(workers), "--batch-size", "1", "--hidden-size", "16",
             "--max-epochs", "1", "--limit-train-batches", "100"]  # fmt: skip
    process = start(flags, tmp_path)
    try:
        wait_for_training(process, tmp_path)
        os.killpg(process.pid, signum) if group else process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr and "error:" not in stderr, stderr
    (report,) = STOPPED.findall(stderr)
    name, step, command = report
    assert name == signum.name
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, int(step)) and int(step) >= 20
    assert shlex.split(command)[:2] == [sys.executable, str(SCRIPT)]
    no_temporary_file(tmp_path)
    if signum != signal.SIGTERM:
        return
    # The command as printed, pasted into a shell: the run goes on from that step to its end.
    resumed = subprocess.run(
        command, check=False, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 100
    assert reported_accuracy(resumed.stdout) >= 50.0
    no_temporary_file(tmp_path)


def test_a_closed_terminal_stops_the_run_with_its_steps_saved(tiny_mnist, tmp_path):
    # The run's terminal is a pseudo-terminal that this test closes, as an ssh session that ends
    # closes its own: the kernel sends SIGHUP, and writes to the terminal fail from then on.
    pty, fcntl, termios = (pytest.importorskip(name) for name in ("pty", "fcntl", "termios"))
    controller, terminal = pty.openpty()
    flags = ["--data-dir", str(tiny_mnist), "--num-workers", "2", "--batch-size", "1", "--hidden-size", "16"]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *flags, "--limit-train-batches", "50", "--max-epochs", "9"], cwd=tmp_path,
        stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # noqa: PLW1509 (an ioctl only): the run's terminal
    )  # fmt: skip
    os.close(terminal)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while not last.exists():  # saved at the end of epoch 0, at step 50
            assert process.poll() is None and time.monotonic() < deadline
            select.select([controller], [], [], 0.05)[0] and os.read(controller, 1 << 16)  # as a terminal shows it
        os.close(controller)
        assert process.wait(timeout=60) == 128 + signal.SIGHUP
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    saved = torch.load(last, weights_only=True)
    step = saved["global_step"]
    assert step >= 50 and (step - 1) // 50 <= saved["epoch"] <= step // 50  # 50 steps an epoch
    no_temporary_file(tmp_path)


## The command that continues a run


FLAGS = {"--max-epochs": st.integers(1, 9).map(str), "--lr": st.sampled_from(["0.01", "1e-3"]),
         "--data-dir": st.text(st.sampled_from("ab '\"$;*-=é"), min_size=1).map(lambda text: f"d{text}"),
         "--precision": st.just("32-true"), "--deterministic": st.none()}  # fmt: skip
CKPT_PATH_FORMS = [
    lambda path: ["--ckpt-path", path],
    lambda path: [f"--ckpt-path={path}"],
    lambda path: ["--ckpt", path],  # argparse takes any unambiguous start of a flag's name
    lambda path: [f"--ckpt-p={path}"],
]


@st.composite
def command_lines(draw) -> list[str]:
    """A command line of this script's flags, in any order, with values a shell must quote; and
    --lr-find in any of its spellings, unless --lr is given."""
    argv = []
    flags = draw(st.lists(st.sampled_from(sorted(FLAGS)), unique=True))
    for flag in flags:
        value = draw(FLAGS[flag])
        argv += [flag] if value is None else draw(st.sampled_from([[flag, value], [f"{flag}={value}"]]))
    if "--lr" not in flags and draw(st.booleans()):
        between_flags = [index for index, word in enumerate(argv) if word.startswith("--")] + [len(argv)]
        argv.insert(draw(st.sampled_from(between_flags)), draw(st.sampled_from(["--lr-find", "--lr-fi", "--lr-"])))
    return argv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines(), form=st.sampled_from(CKPT_PATH_FORMS), place=st.integers(0, 20), data=st.data())
def test_the_resume_command_is_the_same_command_with_the_new_checkpoint(argv, form, place, data, tmp_path):
    names = st.text(st.sampled_from("ab '\"$=-"), min_size=1)
    old = tmp_path / f"old {data.draw(names)}.ckpt"
    new = tmp_path / f"new {data.draw(names)}.ckpt"
    old.touch(), new.touch()
    between_flags = [index for index, word in enumerate(argv) if word.startswith("--")] + [len(argv)]
    place = between_flags[place % len(between_flags)]
    started = [*argv[:place], *form(str(old)), *argv[place:]]
    words = shlex.split(resume_command(started, new, SCRIPT))  # as a shell splits the printed line
    assert words[:2] == [sys.executable, str(SCRIPT)]
    # The same run, continued: its flags but --lr-find, whose rate the checkpoint holds.
    assert vars(parse_args(words[2:])) == vars(parse_args(argv)) | {"ckpt_path": str(new), "lr_find": False}


## A second signal


class SignalTwice(pl.Callback):
    """Sends this process a signal twice, at the start of one training step."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            os.kill(os.getpid(), self.signum)
            raise AssertionError("the second signal did not stop the run at once")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_and_says_what_last_ckpt_holds(
    signum, tiny_mnist, in_tmp_path, capsys, monkeypatch
):
    trainers_with(monkeypatch, SignalTwice(signum, step=8))  # epoch 1 begins at step 6
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "2"]) == 128 + signum
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = in_tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    held = torch.load(last, weights_only=True)["global_step"]
    assert f"Stopped by {signum.name} in epoch 1 at step 8." in err
    assert held == 8 or f"last.ckpt holds step {held}: the {8 - held} steps after it are lost." in err
    no_temporary_file(in_tmp_path)


## Under DDP the processes agree on a signal, however the devices are spread over the machines


class Strategy:
    """A DDP strategy's reduce between processes, as if the other process had had signal `other`."""

    def __init__(self, other: int) -> None:
        self.other, self.calls = other, 0

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "max"
        self.calls += 1
        return torch.maximum(tensor, torch.tensor(self.other))


@pytest.mark.parametrize(("num_nodes", "devices"), [(2, 1), (1, 2), (4, 2)])
def test_processes_agree_on_a_signal_on_any_layout_of_devices(num_nodes, devices):
    strategy = Strategy(other=signal.SIGTERM)
    world = SimpleNamespace(num_nodes=num_nodes, num_devices=devices, world_size=num_nodes * devices,
                            log_every_n_steps=10, strategy=strategy)  # fmt: skip
    module = SimpleNamespace(device=torch.device("cpu"))
    stopper = StopOnSignal()  # this process had no signal; another had SIGTERM
    stopper.on_train_batch_end(SimpleNamespace(**vars(world), global_step=7), module, None, None, 6)
    assert strategy.calls == 0  # they agree every 10 steps, not at every one
    with pytest.raises(Stopped) as stopped:
        stopper.on_train_batch_end(SimpleNamespace(**vars(world), global_step=10), module, None, None, 9)
    assert strategy.calls == 1 and stopped.value.signal == signal.SIGTERM and stopped.value.code == 143


def test_a_single_process_stops_at_the_step_after_its_signal_without_a_message():
    strategy = Strategy(other=0)
    trainer = SimpleNamespace(world_size=1, global_step=7, log_every_n_steps=10, strategy=strategy)
    stopper = StopOnSignal()
    stopper.on_train_batch_end(trainer, None, None, None, 6)
    stopper._note(signal.SIGHUP, None)
    with pytest.raises(Stopped) as stopped:
        stopper.on_train_batch_end(trainer, None, None, None, 6)
    assert stopped.value.code == 128 + signal.SIGHUP and strategy.calls == 0


## Checkpoint writes: forced onto the disk, and whole or absent whatever stops them


def test_a_checkpoint_and_its_rename_are_forced_onto_the_disk(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda *paths: (events.append(("replace",)), replace(*paths))[1])
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": LitNeuralNet(hidden_size=4).state_dict()}, path)
    file, folder = path.stat().st_ino, path.parent.stat().st_ino
    assert events == [("fsync", file), ("replace",), ("fsync", folder)]


class StopInside:
    """torch.save that writes part of the checkpoint, and then is stopped by `stop`."""

    def __init__(self, stop: BaseException) -> None:
        self.stop, self.save = stop, torch.save

    def __call__(self, checkpoint, file) -> None:
        file.write(b"PK\x03\x04" + b"\0" * 1000)
        raise self.stop


@pytest.mark.parametrize(
    "stop", [KeyboardInterrupt(), Stopped(signal.SIGTERM), Stopped(signal.SIGHUP), MemoryError()], ids=repr
)
def test_a_checkpoint_save_stopped_part_way_leaves_the_previous_whole_and_no_temporary_file(
    stop, tmp_path, monkeypatch
):
    path = tmp_path / "last.ckpt"
    before = {"state_dict": LitNeuralNet(hidden_size=4).state_dict(), "global_step": 6}
    AtomicCheckpointIO().save_checkpoint(before, path)
    monkeypatch.setattr(torch, "save", StopInside(stop))
    with pytest.raises(type(stop)):
        AtomicCheckpointIO().save_checkpoint({**before, "global_step": 9}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 6
    assert sorted(tmp_path.iterdir()) == [path]


## MNIST's .gz files: unpacked whole, or not at all


def test_a_gz_file_unpacked_when_a_signal_comes_leaves_neither_a_half_file_nor_a_temporary_one(
    tiny_mnist, in_tmp_path, capsys, monkeypatch
):
    raw = in_tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(tiny_mnist, in_tmp_path / "data")
    for file in list(raw.iterdir()):
        (raw / f"{file.name}.gz").write_bytes(gzip.compress(file.read_bytes()))
        file.unlink()
    write_bytes = Path.write_bytes

    def write_half_then_signal(self, data):  # a write that SIGTERM interrupts half-way
        write_bytes(self, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Path, "write_bytes", write_half_then_signal)
    assert main(["--data-dir", str(in_tmp_path / "data"), "--max-epochs", "1"]) == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM" in capsys.readouterr().err
    assert sorted(path.name for path in raw.iterdir()) == sorted(f"{name}.gz" for name in mnist_kit.data.MNIST_FILES)
    monkeypatch.undo()
    download_mnist(str(in_tmp_path / "data"))  # the next run unpacks them whole
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == (tiny_mnist / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()  # fmt: skip


## Weights that are NaN or infinite are never saved, tested, reported or used


def test_a_run_that_diverges_in_its_first_steps_saves_and_tests_nothing(tiny_mnist, in_tmp_path, capsys):
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--lr", "1e30", "--limit-train-batches", "5")
    assert error.startswith("error: the weights became NaN or infinite by step ")
    assert finite_checkpoints(in_tmp_path) == []


class Poison(pl.Callback):
    """Makes one weight `value` at the end of one training step, as an overflow in the optimizer would."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.l2.bias[3] = self.value


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    step=st.sampled_from([6, 12, 3, 10, 8]),  # the last step of epochs 0 and 1, a middle one, a logged one
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    limit_val_batches=st.sampled_from(["1.0", "0"]),  # with a validation at each epoch's end, or none
)
def test_a_weight_made_non_finite_at_any_step_stops_the_run_before_a_save_or_a_test(
    step, value, limit_val_batches, tiny_mnist, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / f"example_{len(list(tmp_path.iterdir()))}"  # one per example Hypothesis tries
    folder.mkdir()
    with monkeypatch.context() as patch:
        patch.chdir(folder)
        trainers_with(patch, Poison(step, value))
        error = fails(
            capsys, "--data-dir", str(tiny_mnist), "--max-epochs", "3", "--limit-val-batches", limit_val_batches
        )
    (reported,) = re.findall(r"^error: the weights became NaN or infinite by step (\d+): the model diverged", error)
    # Found no later than the next step that logs (every 10th) or ends an epoch (every 6th).
    assert step <= int(reported) <= min(later for later in range(step + 1, 19) if later % 10 == 0 or later % 6 == 0)
    for checkpoint in finite_checkpoints(folder):  # the epochs before are saved, whole and finite
        assert torch.load(checkpoint, weights_only=True)["global_step"] < step


class PoisonThenHeal(pl.Callback):
    """Makes a weight NaN in step 3's update, and every number finite again before step 4."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 2:  # the update that makes step 3
            with torch.no_grad():
                pl_module.l2.bias[3] = math.nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            optimizer = trainer.optimizers[0]
            state = [value for values in optimizer.state.values() for value in values.values()]
            for tensor in [*pl_module.parameters(), *state]:
                tensor.data.nan_to_num_(0.0)


def test_weights_that_were_nan_for_a_single_step_stop_the_run(tiny_mnist, in_tmp_path, capsys, monkeypatch):
    # A step with NaN weights made NaN gradients and Adam's state: what follows means nothing,
    # even when another callback (or a clamp) makes the weights look finite by the next check.
    trainers_with(monkeypatch, PoisonThenHeal())
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--max-epochs", "2")
    assert error.startswith("error: the weights became NaN or infinite by step 6: ")  # the epoch's end
    assert finite_checkpoints(in_tmp_path) == []


def test_a_loss_that_is_nan_in_validation_only_stops_the_run(tiny_mnist, in_tmp_path, capsys, monkeypatch):
    validation_step = LitNeuralNet.validation_step

    def overflowing(self, batch, batch_idx):  # finite weights, and logits that overflow
        images, labels = batch
        return validation_step(self, (images * 1e38 * 1e38, labels), batch_idx)

    monkeypatch.setattr(LitNeuralNet, "validation_step", overflowing)
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--max-epochs", "1")
    assert error.startswith("error: the model's outputs gave a val_loss of nan by step 6")
    assert "best" not in " ".join(path.name for path in finite_checkpoints(in_tmp_path))


def one_drawn(path: Path) -> Path:
    """A picture of a stroke, light on black: a 1, to the eye."""
    picture = Image.new("L", (28, 28), 0)
    picture.paste(255, (12, 5, 16, 23))
    picture.save(path)
    return path


@pytest.fixture
def diverged(trained, tmp_path) -> Path:
    """A checkpoint of this script with one NaN weight, as older versions of it saved."""
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["state_dict"]["l1.weight"][7, 300] = math.nan
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    return tmp_path / "diverged.ckpt"


def test_predict_refuses_a_checkpoint_with_nan_weights(diverged, in_tmp_path, capsys):
    picture = in_tmp_path / "one.png"
    one_drawn(picture)
    error = fails(capsys, "--predict", str(picture), "--ckpt-path", str(diverged))
    assert error == (
        f"error: {diverged} holds weights that are NaN or infinite: its run diverged, and nothing it predicts or "
        "scores means anything. Use an earlier checkpoint, or train again with a smaller --lr."
    )


def test_a_run_continued_from_a_checkpoint_with_nan_weights_is_refused(diverged, tiny_mnist, in_tmp_path, capsys):
    error = fails(capsys, "--data-dir", str(tiny_mnist), "--max-epochs", "2", "--ckpt-path", str(diverged))
    assert error.startswith(f"error: {diverged} holds weights that are NaN or infinite")
    assert finite_checkpoints(in_tmp_path / "lightning_logs") == []


def test_the_checkpoint_writer_never_writes_non_finite_weights(tmp_path):
    path = tmp_path / "last.ckpt"
    weights = LitNeuralNet(hidden_size=4).state_dict()
    AtomicCheckpointIO().save_checkpoint({"state_dict": weights, "global_step": 1}, path)
    weights["l2.bias"][2] = math.inf
    with pytest.raises(mnist_kit.errors.RunError, match=f"the model diverged, and {re.escape(str(path))} was not"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": weights, "global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1 and sorted(tmp_path.iterdir()) == [path]


## --predict: the interruption is not one of the results


def test_predict_stopped_by_a_signal_says_so_on_stderr_only(trained, in_tmp_path, capsys, monkeypatch):
    pictures = [str(one_drawn(in_tmp_path / f"{index}.png")) for index in range(3)]
    prepare_digit = mnist_kit.command_line.prepare_digit

    def second_picture_then_ctrl_c(path):
        if path == pictures[1]:
            os.kill(os.getpid(), signal.SIGINT)
        return prepare_digit(path)

    monkeypatch.setattr(mnist_kit.command_line, "prepare_digit", second_picture_then_ctrl_c)
    assert main(["--predict", *pictures, "--ckpt-path", str(trained)]) == 128 + signal.SIGINT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == "Stopped by SIGINT while predicting. Run the same command again."


class PoisonOneWeight(pl.Callback):
    """Sets one weight of the first layer to NaN at the end of a step that the Trainer logs."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == trainer.log_every_n_steps:
            with torch.no_grad():
                pl_module.l1.weight[7, 300] = float("nan")


@pytest.fixture(scope="module")
def poisoned_run(tiny_mnist, tmp_path_factory):
    """Three epochs of 6 steps on the tiny MNIST, one weight among 397,510 made NaN after step 10 of 18,
    in epoch 1: main()'s status, its stdout and stderr, and the run's folder."""
    cwd = tmp_path_factory.mktemp("poisoned_run")
    build_trainer = lightning_mnist.build_trainer

    def build_poisoned(args):
        trainer = build_trainer(args)
        trainer.callbacks.insert(0, PoisonOneWeight())  # before the script's own callbacks see the step
        return trainer

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(lightning_mnist, "build_trainer", build_poisoned)
        status = main(["--data-dir", str(tiny_mnist), "--max-epochs", "3"])
    return status, out.getvalue(), err.getvalue(), cwd / "lightning_logs"


def test_one_nan_weight_among_all_ends_training_with_one_error(poisoned_run):
    status, out, err, _ = poisoned_run
    assert status == 1
    assert len(errors_of(err)) == 1
    assert "Test accuracy" not in out


def test_one_nan_weight_leaves_no_checkpoint_holding_it(poisoned_run):
    *_, logs = poisoned_run
    checkpoints = sorted(logs.rglob("*.ckpt"))
    assert checkpoints  # epoch 0's, saved before the NaN
    for checkpoint in checkpoints:
        weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        assert all(weight.isfinite().all() for weight in weights.values()), checkpoint.name


class BackgroundRun:
    """lightning_mnist.py started in its own process, its output collected as it comes."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 1 << 16):
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for_progress(self, epoch: int, batches: int, at_least: int, timeout: float = 120) -> None:
        """Wait until the progress bar shows at least `at_least` of the epoch's batches done."""
        progress = re.compile(rf"Epoch {epoch}: .*?\| *(\d+)/{batches}\b")
        deadline = time.monotonic() + timeout
        while not any(int(done) >= at_least for done in progress.findall(self.output[-20_000:])):
            assert self.process.poll() is None, self.output
            assert time.monotonic() < deadline, self.output
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_) -> None:
        self.process.kill()  # whatever happened, it does not outlive the test
        self.reader.join()


# 300 batches of one image an epoch, a small net: epochs long enough to interrupt in the middle.
STEPS_PER_EPOCH = 300


SLOW_RUN = ("--batch-size", "1", "--hidden-size", "16", "--limit-train-batches", str(STEPS_PER_EPOCH))


SLOW_RUN += ("--limit-val-batches", "5", "--max-epochs", "2")


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_to_the_planned_steps(tiny_mnist, tmp_path):
    flags = ["--data-dir", str(tiny_mnist), *SLOW_RUN]
    with BackgroundRun(*flags, cwd=tmp_path) as run:
        run.wait_for_progress(epoch=1, batches=STEPS_PER_EPOCH, at_least=5)
        run.process.send_signal(signal.SIGTERM)
        assert run.finish() == 128 + signal.SIGTERM, run.output

    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] == 1 and STEPS_PER_EPOCH < saved["global_step"] < 2 * STEPS_PER_EPOCH  # mid-epoch
    # The message says once how to go on: this run's command with --ckpt-path.
    assert re.findall(r"Stopped by SIGTERM in epoch 1 at step (\d+)\. Continue it with:", run.output) == [
        str(saved["global_step"])
    ]
    commands = re.findall(r"^  (.+ --ckpt-path .+)$", run.output, re.MULTILINE)
    assert len(commands) == 1
    command = shlex.split(commands[0])
    assert command == [sys.executable, str(SCRIPT), *flags, "--ckpt-path", str(checkpoint)]  # the Python that ran

    resumed = run_script(*command[2:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert reported_accuracy(resumed.stdout) >= 90.0
    # The run went on in its own folder, and its last.ckpt holds where it ended.
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    final = torch.load(checkpoint, weights_only=False)
    assert final["epoch"] == 1 and final["global_step"] == 2 * STEPS_PER_EPOCH
    # Adam counts its steps: it went on from the saved state instead of starting again.
    assert {state["step"].item() for state in final["optimizer_states"][0]["state"].values()} == {2 * STEPS_PER_EPOCH}


def test_ctrl_c_mid_epoch_saves_a_checkpoint_and_exits_130(tiny_mnist, tmp_path):
    with BackgroundRun("--data-dir", str(tiny_mnist), *SLOW_RUN, cwd=tmp_path) as run:
        run.wait_for_progress(epoch=0, batches=STEPS_PER_EPOCH, at_least=5)
        run.process.send_signal(signal.SIGINT)
        assert run.finish() == 128 + signal.SIGINT, run.output
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert 0 < torch.load(checkpoint, weights_only=False)["global_step"] < STEPS_PER_EPOCH
    assert run.output.count("Stopped by SIGINT in epoch 0 at step ") == 1
    assert f"--ckpt-path {checkpoint}\n" in run.output
    assert "Traceback" not in run.output


class SignalAt(pl.Callback):
    """Sends this process a signal once, at one moment of the run."""

    def __init__(self, signum: int, moment: str) -> None:
        self.signum, self.moment, self.sent = signum, moment, False

    def _at(self, moment: str) -> None:
        if moment == self.moment and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._at("restore")

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._at("sanity check")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 2:
            self._at("training")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._at("validation" if trainer.current_epoch == 0 else "last validation")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._at("final test")


@pytest.mark.parametrize(
    ("signum", "moment", "where", "continued"),
    [
        (signal.SIGTERM, "learning-rate finder", "during the learning-rate finder, before training", False),
        (signal.SIGINT, "learning-rate finder", "during the learning-rate finder, before training", False),
        (signal.SIGINT, "sanity check", "in epoch 0 at step 1", True),
        (signal.SIGTERM, "training", "in epoch 1 at step 9", True),
        (signal.SIGINT, "training", "in epoch 1 at step 9", True),
        (signal.SIGTERM, "validation", "in epoch 1 at step 7", True),
        (signal.SIGINT, "last validation", "after training had finished, before the final test", True),
        (signal.SIGTERM, "restore", "before training went on", True),
    ],
)
def test_an_interrupted_run_says_where_it_stopped_and_how_to_continue(
    signum, moment, where, continued, finished_run, tiny_mnist, in_tmp_path, capsys, monkeypatch
):
    argv = ["--data-dir", str(tiny_mnist), "--max-epochs", "2"]
    if moment == "learning-rate finder":
        argv += ["--lr-find"]
        training_step = LitNeuralNet.training_step

        def training_step_then_signal(self, batch, batch_idx):  # the finder's first steps are the run's first
            if self.global_step == 3:
                os.kill(os.getpid(), signum)
            return training_step(self, batch, batch_idx)

        monkeypatch.setattr(LitNeuralNet, "training_step", training_step_then_signal)
    if moment == "restore":
        run = in_tmp_path / "lightning_logs" / "version_0"
        shutil.copytree(finished_run / "lightning_logs" / "version_0", run)
        argv += ["--ckpt-path", str(run / "checkpoints" / "last.ckpt")]
    trainers_with(monkeypatch, SignalAt(signum, moment))

    assert main(argv) == 128 + signum
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    last = in_tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    report = captured.err[captured.err.index("Stopped by") :].splitlines()
    if continued:
        flags = argv[:-2] if moment == "restore" else argv  # the command leaves out the --ckpt-path it had
        command = " ".join([sys.executable, str(SCRIPT), *flags, "--ckpt-path"])
        assert report == [f"Stopped by {signum.name} {where}. Continue it with:", f"  {command} {last}"]
        saved = torch.load(last, weights_only=True)
        if where.startswith("in epoch"):  # the checkpoint holds the step where it stopped
            assert f"in epoch {saved['epoch']} at step {saved['global_step']}" in where
    else:
        nothing = "Nothing to continue: it had saved no checkpoint. Run the same command again."
        assert report == [f"Stopped by {signum.name} {where}. {nothing}"]
        assert not list(in_tmp_path.glob("lightning_logs/*"))  # the run's empty folder is gone
    nothing_stray(in_tmp_path)


def test_a_signal_during_the_final_test_lets_it_finish(tiny_mnist, in_tmp_path, capsys, monkeypatch):
    trainers_with(monkeypatch, SignalAt(signal.SIGTERM, "final test"))
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"]) == 0
    assert reported_accuracy(capsys.readouterr().out) >= 90.0


def test_the_lightning_mnist_module_sees_no_leftover_handler(tiny_mnist, in_tmp_path):
    before = {signum: signal.getsignal(signum) for signum in mnist_kit.signals.STOP_SIGNALS}
    assert main(["--data-dir", str(tiny_mnist), "--fast-dev-run"]) == 0
    assert {signum: signal.getsignal(signum) for signum in before} == before
    assert torch.distributed.is_initialized() is False
