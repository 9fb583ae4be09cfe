"""A user's mistake or the machine's fault ends in one `error:` line and a non-zero exit, never a
traceback; Ctrl-C and SIGTERM end with where the run stopped and how to continue it; nothing on
disk is lost and nothing stray is left behind."""

import errno
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    SCRIPT,
    TINY_TRAIN,
    make_digits,
    reported_accuracy,
    run_in,
    run_script,
    trainers_with,
    write_idx_images,
    write_idx_labels,
)

import lightning_mnist
from lightning_mnist import LitNeuralNet, RunError, build_trainer, main, parse_args


def fails(capsys, *argv: str) -> str:
    """Run main in process; it must end with status 1 and one `error:` line, which this returns."""
    status = main(list(argv))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert status == 1 and len(errors) == 1, (status, captured.err[-3000:])
    assert "Traceback" not in captured.err + captured.out
    assert "Test accuracy" not in captured.out  # nothing that looks like a result
    return errors[0]


def nothing_stray(folder: Path) -> None:
    """No temporary file of a checkpoint or of the learning-rate finder is left under folder."""
    assert not [path for path in folder.rglob("*") if path.name.endswith(".tmp") or ".lr_find" in path.name]


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    """A folder where a 1-epoch run of the tiny MNIST finished: lightning_logs/version_0."""
    return run_in(tmp_path_factory.mktemp("finished_run"), ["--data-dir", str(tiny_mnist), "--max-epochs", "1"])


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_mnist_file_is_named(tiny_mnist, in_tmp_path, capsys):
    data = in_tmp_path / "data"
    shutil.copytree(tiny_mnist, data)
    unreadable = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    unreadable.chmod(0)
    error = fails(capsys, "--data-dir", str(data))
    assert error == f"error: Permission denied: {unreadable}."


def test_a_folder_where_an_mnist_file_belongs_is_named(tiny_mnist, in_tmp_path, capsys):
    data = in_tmp_path / "data"
    shutil.copytree(tiny_mnist, data)
    file = data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    file.unlink()
    file.mkdir()
    error = fails(capsys, "--data-dir", str(data))
    assert (
        error
        == f"error: {file} is a folder, not a file. Replace it with an intact copy, or delete it to download MNIST again."
    )


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


@pytest.fixture
def data(tiny_mnist, in_tmp_path) -> Path:
    """A copy of the tiny MNIST to damage; its MNIST/raw folder."""
    shutil.copytree(tiny_mnist, in_tmp_path / "data")
    return in_tmp_path / "data" / "MNIST" / "raw"


def test_one_missing_file_is_named_alone(data, capsys, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # no download can work
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    (data / "t10k-labels-idx1-ubyte").unlink()
    error = fails(capsys, "--data-dir", str(data.parents[1]))
    assert error.startswith(f"error: t10k-labels-idx1-ubyte is not in {data} and could not be downloaded")
    assert error.count("idx") == 1


def test_a_wrong_magic_number_is_named_with_its_file(data, capsys):
    images = data / "train-images-idx3-ubyte"
    images.write_bytes(bytes.fromhex("00000801") + images.read_bytes()[4:])
    error = fails(capsys, "--data-dir", str(data.parents[1]))
    assert error == (
        f"error: {images} starts with 0x00000801, where MNIST images files start with 0x00000803. "
        "Replace it with an intact copy, or delete it to download MNIST again."
    )


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_mnist_files_are_named(damage, data, capsys):
    images = data / "train-images-idx3-ubyte"
    content = images.read_bytes()
    images.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"\x07" * 16 + content[16:])
    error = fails(capsys, "--data-dir", str(data.parents[1]))
    assert error.startswith(f"error: {images} ") and "Replace it with an intact copy" in error


def test_gz_files_of_ones_own_are_unpacked_and_read(data, in_tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # they are read, not downloaded again
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    originals = {}
    for file in list(data.iterdir()):
        originals[file.name] = file.read_bytes()
        (data / f"{file.name}.gz").write_bytes(gzip.compress(originals[file.name], mtime=0))  # not the official bytes
        file.unlink()
    assert main(["--data-dir", str(data.parents[1]), "--fast-dev-run"]) == 0
    assert {file.name: file.read_bytes() for file in data.iterdir() if file.suffix != ".gz"} == originals


def test_a_damaged_gz_file_is_named(data, capsys):
    labels = data / "t10k-labels-idx1-ubyte"
    (data / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels.read_bytes())[:30])
    labels.unlink()
    error = fails(capsys, "--data-dir", str(data.parents[1]))
    assert error.startswith(f"error: {labels}.gz could not be unpacked (")


@pytest.mark.parametrize(("images", "problem"), [(6, "holds 6 images: too few"), (0, "-idx3-ubyte holds no images.")])
def test_a_training_file_too_small_to_train_and_validate_is_refused(images, problem, data, capsys):
    digits, labels = make_digits(TINY_TRAIN, seed=0)
    write_idx_images(data / "train-images-idx3-ubyte", digits[:images])
    write_idx_labels(data / "train-labels-idx1-ubyte", labels[:images])
    error = fails(capsys, "--data-dir", str(data.parents[1]))
    assert problem in error


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


## DDP: one report, no traceback from the other process, no process left behind


DDP = ("--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")


def test_under_ddp_an_error_is_printed_once_and_no_process_outlives_the_run(tiny_mnist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_mnist, data)
    _, labels = make_digits(TINY_TRAIN, seed=0)
    labels[3] = 11
    write_idx_labels(data / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--data-dir", str(data), *DDP],
            cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            assert process.wait(timeout=120) == 1
            time.sleep(6)  # what a process still running would print after the prompt is back
        finally:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    output = (tmp_path / "output.txt").read_text()
    assert "Traceback" not in output
    assert re.findall(r"^error: .*$", output, re.MULTILINE) == [
        f"error: {data / 'MNIST' / 'raw' / 'train-labels-idx1-ubyte'} holds labels up to 11; MNIST labels are 0-9."
    ]
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # the whole process group is gone


def test_under_ddp_sigterm_to_the_first_process_stops_both_and_the_run_continues(tiny_mnist, tmp_path):
    flags = ["--data-dir", str(tiny_mnist), *DDP, "--batch-size", "1", "--hidden-size", "16", "--max-epochs", "3"]
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *flags],
            cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not re.search(r"Epoch 0: +\d+%.*?\| *[2-9]\d/275", (tmp_path / "output.txt").read_text()):
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)  # what `kill` sends, to global rank 0 alone
            assert process.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    output = (tmp_path / "output.txt").read_text()
    assert "Traceback" not in output
    (stopped,) = re.findall(r"^Stopped by SIGTERM in epoch 0 at step (\d+)0\. Continue it with:$", output, re.MULTILINE)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == int(stopped) * 10
    resumed = run_script(*flags, "--ckpt-path", str(last), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(last, weights_only=True)["global_step"] == 3 * 275  # 550 images of one, shared by 2 processes
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]


def test_ddp_spawn_keeps_one_run_in_one_folder(tiny_mnist, tmp_path):
    result = run_script("--data-dir", str(tiny_mnist), "--accelerator", "cpu", "--devices", "2",
                        "--strategy", "ddp_spawn", "--max-epochs", "1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    assert f"Run folder: {tmp_path / 'lightning_logs' / 'version_0'}\n" in result.stdout
    assert list((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))


def test_under_ddp_spawn_an_error_in_a_training_process_is_one_line(tiny_mnist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_mnist, data)
    images = data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(b"")
    result = run_script("--data-dir", str(data), "--accelerator", "cpu", "--devices", "2",
                        "--strategy", "ddp_spawn", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert re.findall(r"^error: .*$", result.stderr, re.MULTILINE) == [
        f"error: {images} is empty. Replace it with an intact copy, or delete it to download MNIST again."
    ]


def test_the_lightning_mnist_module_sees_no_leftover_handler(tiny_mnist, in_tmp_path):
    before = {signum: signal.getsignal(signum) for signum in lightning_mnist.STOP_SIGNALS}
    assert main(["--data-dir", str(tiny_mnist), "--fast-dev-run"]) == 0
    assert {signum: signal.getsignal(signum) for signum in before} == before
    assert lightning_mnist.dist.is_initialized() is False


## A bug of the script keeps its traceback


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"), RuntimeError("mat1 and mat2 shapes differ")])
def test_a_bug_of_the_script_is_not_turned_into_an_error_line(bug, tiny_mnist, in_tmp_path, monkeypatch):
    def training_step(self, batch, batch_idx):
        raise bug

    monkeypatch.setattr(LitNeuralNet, "training_step", training_step)
    with pytest.raises(type(bug), match=str(bug)):
        main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"])
