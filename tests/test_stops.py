"""Every way a run is asked to stop (Ctrl-C, SIGTERM, SIGHUP; to the process or to its whole group,
with DataLoader workers) ends the same way: last.ckpt saved at the step where it stopped, one
"Stopped by" line on stderr with a command that continues the run, exit 128 + the signal's number,
and no temporary file left. And no weight that is NaN or infinite is ever saved, tested or used."""

import contextlib
import gzip
import io
import itertools
import math
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    SCRIPT,
    best_checkpoint,
    errors_of,
    fails,
    nothing_stray,
    reported_accuracy,
    run_in,
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
from mnist_kit.checkpoints import AtomicCheckpointIO, stored_score
from mnist_kit.data import download_mnist
from mnist_kit.flags import rerun_command, resume_command
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


## A closed terminal


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

    root_device = torch.device("cpu")

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
    mnist_kit.signals._note(signal.SIGHUP, None)
    try:
        with pytest.raises(Stopped) as stopped:
            stopper.on_train_batch_end(trainer, None, None, None, 6)
    finally:
        mnist_kit.signals.forget_noted()
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


@pytest.mark.parametrize("signals", [1, 2], ids=["one signal: noted", "two signals: at once"])
def test_a_gz_file_unpacked_when_a_signal_comes_leaves_neither_a_half_file_nor_a_temporary_one(
    signals, tiny_mnist, in_tmp_path, capsys, monkeypatch
):
    raw = in_tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(tiny_mnist, in_tmp_path / "data")
    for file in list(raw.iterdir()):
        (raw / f"{file.name}.gz").write_bytes(gzip.compress(file.read_bytes()))
        file.unlink()
    write_bytes = Path.write_bytes

    def write_half_then_signal(self, data):  # a write that the signals reach half-way
        write_bytes(self, data[: len(data) // 2])
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)
        write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_half_then_signal)
    assert main(["--data-dir", str(in_tmp_path / "data"), "--max-epochs", "1"]) == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM before" in capsys.readouterr().err
    names = sorted(path.name for path in raw.iterdir())
    unpacked = [name for name in names if not name.endswith(".gz")]
    # One signal is noted: the file being unpacked is unpacked whole, and the run stops before
    # it trains. A second stops at once: that file is not there at all.
    assert len(unpacked) == (1 if signals == 1 else 0) and not [name for name in names if name.endswith(".tmp")]
    for name in unpacked:
        assert (raw / name).read_bytes() == (tiny_mnist / "MNIST" / "raw" / name).read_bytes()
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
        # Set-up (the finder, the sanity check) ends at the stop point before the first step.
        (signal.SIGTERM, "learning-rate finder", "before the first training step", False),
        (signal.SIGINT, "learning-rate finder", "before the first training step", False),
        (signal.SIGINT, "sanity check", "before the first training step", False),
        (signal.SIGTERM, "training", "in epoch 1 at step 9", True),
        (signal.SIGINT, "training", "in epoch 1 at step 9", True),
        (signal.SIGTERM, "validation", "in epoch 1 at step 7", True),
        (signal.SIGINT, "last validation", "after training had finished, before the final test", True),
        (signal.SIGTERM, "restore", "in epoch 1 at step 6", True),  # where the checkpoint had stopped
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
        nothing = "Nothing to continue: it had saved no checkpoint. Run it again with:"
        assert report == [f"Stopped by {signum.name} {where}. {nothing}", f"  {rerun_command(argv, SCRIPT)}"]
        assert not list(in_tmp_path.glob("lightning_logs/*"))  # the run's empty folder is gone
    nothing_stray(in_tmp_path)


def test_a_signal_during_the_final_test_lets_it_finish_and_then_stops(tiny_mnist, in_tmp_path, capsys, monkeypatch):
    trainers_with(monkeypatch, SignalAt(signal.SIGTERM, "final test"))
    argv = ["--data-dir", str(tiny_mnist), "--max-epochs", "1"]
    assert main(argv) == 128 + signal.SIGTERM
    captured = capsys.readouterr()
    assert "Test accuracy" not in captured.out  # a stopped run claims no result
    last = in_tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    report = captured.err[captured.err.index("Stopped by") :].splitlines()
    assert report == [
        "Stopped by SIGTERM during the final test, after training had finished. Continue it with:",
        f"  {resume_command(argv, last, SCRIPT)}",
    ]
    assert torch.load(last, weights_only=True)["global_step"] == 6  # the last epoch's, not the best's
    monkeypatch.undo()
    assert main([*argv, "--ckpt-path", str(last)]) == 0  # the command: it tests, with the best epoch
    assert reported_accuracy(capsys.readouterr().out) >= 90.0


def test_the_lightning_mnist_module_sees_no_leftover_handler(tiny_mnist, in_tmp_path):
    before = {signum: signal.getsignal(signum) for signum in mnist_kit.signals.STOP_SIGNALS}
    assert main(["--data-dir", str(tiny_mnist), "--fast-dev-run"]) == 0
    assert {signum: signal.getsignal(signum) for signum in before} == before
    assert torch.distributed.is_initialized() is False


## One stop policy across the whole class: every signal, target, DataLoader workers, processes and phase

STOP_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import pytorch_lightning as pl
    import lightning_mnist

    PHASE = os.environ["STOP_TEST_PHASE"]


    class Reached(pl.Callback):
        # On global rank 0, at the phase: say so in a file, and stay in the phase while the signal comes.
        def _at(self, trainer, phase):
            if phase == PHASE and trainer.global_rank == 0 and not os.path.exists("reached"):
                open("reached", "w").close()
                time.sleep(1)

        def setup(self, trainer, pl_module, stage):
            self._at(trainer, "set-up")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 15:
                self._at(trainer, "training")

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if not trainer.sanity_checking:
                self._at(trainer, "validation")

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self._at(trainer, "final test")


    build_trainer = lightning_mnist.build_trainer


    def build_trainer_that_reports(args):
        trainer = build_trainer(args)
        trainer.callbacks.insert(0, Reached())
        return trainer


    lightning_mnist.build_trainer = build_trainer_that_reports
    if __name__ == "__main__":
        sys.exit(lightning_mnist.main())
    """
)

STOP_FACTORS = {
    "signal": [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
    "to": ["process", "group"],
    "workers": [0, 2],
    "processes": [1, 2],
    "phase": ["set-up", "training", "validation", "final test"],
}


def pairwise_cases(factors: dict[str, list]) -> list[dict]:
    """Cases in which every value of each factor meets every value of each other factor at least
    once: a greedy all-pairs cover of the full product, deterministic, far smaller than it."""
    names = list(factors)
    uncovered = {((a, x), (b, y)) for a, b in itertools.combinations(names, 2) for x in factors[a] for y in factors[b]}
    cases = []
    while uncovered:
        best = max(
            itertools.product(*factors.values()),
            key=lambda values: sum(
                ((a, values[names.index(a)]), (b, values[names.index(b)])) in uncovered
                for a, b in itertools.combinations(names, 2)
            ),
        )
        case = dict(zip(names, best, strict=True))
        uncovered -= {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}
        cases.append(case)
    return cases


def test_the_cases_cover_every_pair_of_the_factors():
    cases = pairwise_cases(STOP_FACTORS)
    for a, b in itertools.combinations(STOP_FACTORS, 2):
        assert {(case[a], case[b]) for case in cases} == set(itertools.product(STOP_FACTORS[a], STOP_FACTORS[b]))
    assert len(cases) < math.prod(len(values) for values in STOP_FACTORS.values()) / 5


STOP_REPORT = re.compile(r"^Stopped by (\w+) (.+?)\. (?:Continue it with|.*Run it again with):\n  (.+)$", re.MULTILINE)


@pytest.mark.parametrize(
    "case",
    pairwise_cases(STOP_FACTORS),
    ids=lambda case: "-".join(str(getattr(value, "name", value)) for value in case.values()),
)
def test_every_stop_saves_its_step_reports_once_and_the_printed_command_finishes_the_run(case, tiny_mnist, tmp_path):
    (tmp_path / "driver.py").write_text(STOP_DRIVER)
    layout = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"] if case["processes"] == 2 else []
    flags = ["--data-dir", str(tiny_mnist), "--batch-size", "10", "--hidden-size", "16", "--max-epochs", "2",
             "--limit-val-batches", "3", "--num-workers", str(case["workers"]), *layout]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent), "STOP_TEST_PHASE": case["phase"]}
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(
            [sys.executable, "driver.py", *flags], cwd=tmp_path, env=env, stdout=output, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, start_new_session=True, text=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "reached").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
            time.sleep(0.05)
        signum = case["signal"]
        os.killpg(process.pid, signum) if case["to"] == "group" else process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
    (report,) = STOP_REPORT.findall(stderr)  # one report, by global rank 0
    name, where, command = report
    assert name == signum.name
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    steps_per_epoch = math.ceil(550 / case["processes"] / 10)
    if case["phase"] == "set-up":  # before the first step, nothing to save
        assert where == "before the first training step" and not last.exists()
    else:
        saved = torch.load(last, weights_only=True)
        if case["phase"] == "final test":
            assert where == "during the final test, after training had finished"
            assert saved["global_step"] == 2 * steps_per_epoch
        else:  # last.ckpt holds the step where it stopped: the step of the signal, or the next agreed one
            assert where == f"in epoch {saved['epoch']} at step {saved['global_step']}"
            after = 16 if case["phase"] == "training" else steps_per_epoch + 1
            agreed = after if case["processes"] == 1 else math.ceil(after / 10) * 10
            assert saved["global_step"] == agreed
    # The command as printed, pasted into a shell: the run goes on to its planned end and tests its best.
    resumed = subprocess.run(
        command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 2 * steps_per_epoch
    best = best_checkpoint(resumed.stdout)
    scores = [stored_score(path) for path in last.parent.glob("*.ckpt")]
    assert stored_score(best)[0] == max(score for score, _ in filter(None, scores))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_while_torch_is_imported_is_a_report_not_a_traceback(signum, tiny_mnist, tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--data-dir", str(tiny_mnist), "--max-epochs", "1"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        # Once torch's library is loaded, the import of torch and Lightning has seconds to go.
        maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 60
        while "libtorch" not in (maps.read_text() if process.poll() is None else ""):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "Test accuracy" not in out
    assert re.search(
        rf"^Stopped by {signum.name} before training started\. .*Run it again with:$", err, re.MULTILINE
    ), err
    assert not (tmp_path / "lightning_logs").exists()
