"""Trust and scale: resuming after an interruption, bit-identical reruns, DDP across
processes and machines, runs that never overwrite each other, and wrong data files."""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    SCRIPT,
    TINY_TEST,
    TINY_TRAIN,
    best_checkpoint,
    make_digits,
    reported_accuracy,
    run_script,
    trainers_with,
    write_idx_images,
    write_idx_labels,
    write_mnist,
)
from pytorch_lightning.utilities import rank_zero_only
from test_lesson import evaluate
from test_tensorboard import read_events

from lightning_mnist import LitNeuralNet, claim_run_folder, main

## Interruption and resume


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


def test_ckpt_path_resumes_training_where_it_stopped_in_the_same_run(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"]) == 0
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(last, weights_only=False)["global_step"]
    assert steps_per_epoch == 6  # 550 images, batches of 100
    capsys.readouterr()
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--ckpt-path", str(last)]) == 0
    out = capsys.readouterr().out
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 3 * steps_per_epoch and resumed["epoch"] == 2
    assert reported_accuracy(out) == pytest.approx(100 * evaluate(best_checkpoint(out), tiny_mnist), abs=0.006)
    # The same run: one folder, whose curves go on from where they stopped.
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    events = read_events(tmp_path / "lightning_logs" / "version_0")
    assert [event.step for event in events.Scalars("val_acc")] == [5, 11, 17]  # the last step of each epoch


class SpoilFromEpoch(pl.Callback):
    """From the start of epoch 2 the model guesses 0 for every image and learns nothing more; Ctrl-C
    stops the run (when asked to) in the middle of that epoch."""

    def __init__(self, interrupt: bool) -> None:
        self.interrupt = interrupt

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 2:
            with torch.no_grad():
                pl_module.l2.weight.zero_()
                pl_module.l2.bias.copy_(torch.eye(10)[0])
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.interrupt and trainer.current_epoch == 2 and batch_idx == 3:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_run_interrupted_after_its_best_epoch_is_tested_with_that_epochs_checkpoint(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    flags = ["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--lr", "3e-5"]  # epoch 1 validates best
    trainers_with(monkeypatch, SpoilFromEpoch(interrupt=True))
    assert main(flags) == 130
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    (best,) = checkpoints.glob("epoch=1-*.ckpt")
    last = checkpoints / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 16  # stopped in epoch 2
    capsys.readouterr()

    trainers_with(monkeypatch, SpoilFromEpoch(interrupt=False))
    assert main([*flags, "--ckpt-path", str(last)]) == 0
    out = capsys.readouterr().out
    assert best_checkpoint(out) == best  # the best of the whole run, from before the interruption
    assert reported_accuracy(out) == pytest.approx(100 * evaluate(best, tiny_mnist), abs=0.006)
    assert evaluate(last, tiny_mnist) == pytest.approx(0.1)  # what testing the last epoch would have given
    assert sorted(path.name for path in checkpoints.iterdir()) == [best.name, "last.ckpt"]


## Reproducibility


def run_at_once(*runs: tuple[Path, list[str]], timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Start lightning_mnist.py once for each (folder, arguments), all at the same time, and wait for all."""
    processes = []
    try:
        for cwd, args in runs:
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), *args],
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        return results
    finally:
        for process in processes:
            process.kill()  # whatever happened, none outlives the test


def test_same_seed_gives_bit_identical_weights_and_accuracy_and_another_seed_does_not(tiny_mnist, tmp_path):
    flags = ("--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "3", "--deterministic")
    seeds = {"first": "7", "again": "7", "other": "8"}
    for name in seeds:
        (tmp_path / name).mkdir()
    results = run_at_once(*((tmp_path / name, [*flags, "--seed", seed]) for name, seed in seeds.items()))
    assert [result.returncode for result in results] == [0, 0, 0], [result.stderr for result in results]
    outputs = {name: result.stdout for name, result in zip(seeds, results, strict=True)}

    weights = {
        name: torch.load(
            tmp_path / name / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False
        )["state_dict"]
        for name in seeds
    }
    for key in ("l1.weight", "l1.bias", "l2.weight", "l2.bias"):
        assert torch.equal(weights["first"][key], weights["again"][key]), key
        assert not torch.equal(weights["first"][key], weights["other"][key]), key
    assert reported_accuracy(outputs["first"]) == reported_accuracy(outputs["again"])


## DDP: several processes on one machine, and several machines


def assert_matches_one_process_evaluation(checkpoint: Path, reported_test_accuracy: float) -> None:
    """The checkpoint, tested and validated in this one process on every image once, gives the same accuracies."""
    model = LitNeuralNet.load_from_checkpoint(checkpoint)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (tested,) = trainer.test(model, verbose=False)
    assert 100 * tested["test_acc"] == pytest.approx(reported_test_accuracy, abs=0.006)
    (validated,) = trainer.validate(model, verbose=False)
    best_val_acc = next(
        state for key, state in torch.load(checkpoint, weights_only=False)["callbacks"].items() if "val_acc" in key
    )
    assert validated["val_acc"] == pytest.approx(best_val_acc["best_model_score"].item())


@pytest.fixture(scope="module")
def odd_mnist(tmp_path_factory) -> Path:
    """The tiny MNIST with one test image more: 201 do not split evenly over two processes."""
    return write_mnist(tmp_path_factory.mktemp("odd_mnist"), test=TINY_TEST + 1)


# A low learning rate and one epoch keep the accuracy far from 100%, so a miscount shows.
DDP_RUN = ("--accelerator", "cpu", "--strategy", "ddp", "--max-epochs", "1", "--lr", "1e-4")


def test_ddp_on_two_processes_shards_the_data_syncs_the_metrics_and_reports_once(odd_mnist, tmp_path):
    result = run_script("--data-dir", str(odd_mnist), "--devices", "2", *DDP_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr
    accuracy = reported_accuracy(result.stdout)  # printed once, by global rank 0
    assert accuracy < 90.0
    best = best_checkpoint(result.stdout)
    # Each process trained on its own half of the 550 images: 3 batches of 100, not 6.
    assert torch.load(best, weights_only=False)["global_step"] == 3
    assert_matches_one_process_evaluation(best, accuracy)
    assert "DistributedSampler" not in result.stdout + result.stderr
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_started_by_torchrun_train_together_and_report_once(odd_mnist, tmp_path):
    port = free_port()
    nodes = []
    try:
        for node_rank in (0, 1):
            machine = tmp_path / f"machine{node_rank}"  # a folder for each, as on two machines
            machine.mkdir()
            torchrun = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun command runs
            torchrun += ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank)]
            torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
            script = [str(SCRIPT), "--data-dir", str(odd_mnist), "--devices", "1", "--num-nodes", "2", *DDP_RUN]
            with open(machine / "output.txt", "w") as output:
                nodes.append(
                    subprocess.Popen(
                        torchrun + script,
                        cwd=machine,
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # so that the finally below can stop torchrun and its worker
                    )
                )
        for node in nodes:
            node.wait(timeout=180)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    first, second = ((tmp_path / f"machine{rank}" / "output.txt").read_text() for rank in (0, 1))
    assert [node.returncode for node in nodes] == [0, 0], first + second
    assert "MEMBER: 2/2" in second
    accuracy = reported_accuracy(first)
    assert "Test accuracy" not in second
    best = best_checkpoint(first)
    assert torch.load(best, weights_only=False)["global_step"] == 3  # each machine trained on half the data
    assert_matches_one_process_evaluation(best, accuracy)
    assert list((tmp_path / "machine1").iterdir()) == [tmp_path / "machine1" / "output.txt"]  # rank 1 writes nothing


## No lost work


def test_run_folders_are_claimed_one_each_even_when_picked_at_once(tmp_path):
    # Lightning's logger takes the highest version_N plus one, so two runs that look
    # before either has written anything take the same folder. This one claims it as it picks it.
    assert [pl.loggers.TensorBoardLogger(save_dir=tmp_path / "plain").version for _ in range(2)] == [0, 0]
    (tmp_path / "lightning_logs" / "version_3").mkdir(parents=True)
    assert [claim_run_folder(tmp_path) for _ in range(2)] == [4, 5]
    assert sorted(path.name for path in (tmp_path / "lightning_logs").iterdir()) == [f"version_{n}" for n in (3, 4, 5)]


def test_processes_other_than_global_rank_0_claim_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert claim_run_folder(tmp_path) is None
    assert not (tmp_path / "lightning_logs").exists()


def test_runs_started_together_in_one_folder_keep_their_own_logs_and_checkpoints(tiny_mnist, tmp_path):
    earlier = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier run")
    flags = ("--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "2")
    results = run_at_once(*((tmp_path, [*flags, "--hidden-size", size]) for size in ("8", "16")))
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    folders = set()
    for hidden_size, result in zip((8, 16), results, strict=True):
        folder = best_checkpoint(result.stdout).parent.parent
        folders.add(folder)
        for checkpoint in folder.glob("checkpoints/*.ckpt"):
            assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["hidden_size"] == hidden_size
        assert f"hidden_size: {hidden_size}\n" in (folder / "hparams.yaml").read_text()
    assert folders == {tmp_path / "lightning_logs" / f"version_{n}" for n in (1, 2)}
    assert earlier.read_text() == "an earlier run"


## Data files that torchvision reads but that are wrong


def damage_labels_out_of_range(raw: Path) -> str:
    _, labels = make_digits(TINY_TRAIN, seed=0)
    labels[17] = 10  # the first label too large
    write_idx_labels(raw / "train-labels-idx1-ubyte", labels)
    return "holds labels up to 10; MNIST labels are 0-9"


def damage_one_label_missing(raw: Path) -> str:
    _, labels = make_digits(TINY_TEST, seed=1)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", labels[:-1])
    return f"holds {TINY_TEST - 1} labels for the {TINY_TEST} images in {raw / 't10k-images-idx3-ubyte'}"


def damage_images_not_28x28(raw: Path) -> str:
    images, _ = make_digits(TINY_TEST, seed=1)
    write_idx_images(raw / "t10k-images-idx3-ubyte", images[:, :20, :20])
    return "holds 20x20 images; MNIST images are 28x28"


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (damage_labels_out_of_range, "train-labels-idx1-ubyte"),
        (damage_one_label_missing, "t10k-labels-idx1-ubyte"),
        (damage_images_not_28x28, "t10k-images-idx3-ubyte"),
    ],
)
def test_wrong_mnist_files_stop_the_run_before_training_and_name_the_file(
    damage, file, tiny_mnist, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data"
    shutil.copytree(tiny_mnist, data)
    phrase = damage(data / "MNIST" / "raw")
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", str(data), "--max-epochs", "1"]) == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert f"error: {data / 'MNIST' / 'raw' / file} " in error and phrase in error
    assert not list(tmp_path.glob("lightning_logs/*/checkpoints"))  # it stopped before the first step
