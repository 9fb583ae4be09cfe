"""DDP through Lightning's own strategies: processes that shard the data, sync the metrics and
report once, machines started by torchrun, workers that draw augmentations of their own, and
faults of a process that end in one line."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from conftest import (
    DDP,
    ROOT,
    SCRIPT,
    TINY_TEST,
    TINY_TRAIN,
    VALIDATION_IMAGES,
    best_checkpoint,
    errors_of,
    make_digits,
    reported_accuracy,
    run_script,
    write_idx_labels,
    write_mnist,
)

from lightning_mnist import LitNeuralNet, main

# Lightning's ddp strategy starts the other process by running this same script again.
DDP_DRIVER = textwrap.dedent(
    """
    import sys

    import numpy as np
    import pytorch_lightning as pl
    import torch

    import lightning_mnist
    import mnist_kit.data

    original = mnist_kit.data.MNISTTensors.__getitems__


    def jittered(self, indices):
        images, labels = original(self, indices)
        images[:, 0, 0, 0] = torch.from_numpy(np.random.random(len(labels))).float()
        return images, labels


    class SaveDraws(pl.Callback):
        def __init__(self):
            self.draws = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.draws.append(batch[0][:, 0, 0, 0].clone())

        def on_train_end(self, trainer, pl_module):
            torch.save(torch.cat(self.draws), f"draws_{trainer.global_rank}.pt")


    build_trainer = lightning_mnist.build_trainer


    def build_saving_draws(args):
        trainer = build_trainer(args)
        trainer.callbacks.append(SaveDraws())
        return trainer


    mnist_kit.data.MNISTTensors.__getitems__ = jittered
    lightning_mnist.build_trainer = build_saving_draws
    if __name__ == "__main__":
        sys.exit(lightning_mnist.main())
    """
)


def test_ddp_processes_with_workers_draw_augmentations_of_their_own(tiny_mnist, tmp_path):
    # Every process is seeded alike, so that they start from the same weights; their workers must not
    # repeat each other's random augmentations, or two processes train on the same variations.
    (tmp_path / "driver.py").write_text(DDP_DRIVER)
    result = subprocess.run(
        [sys.executable, "driver.py", "--data-dir", str(tiny_mnist), "--accelerator", "cpu", "--devices", "2",
         "--strategy", "ddp", "--num-workers", "1", "--max-epochs", "1", "--limit-val-batches", "0"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (torch.load(tmp_path / f"draws_{rank}.pt", weights_only=True) for rank in (0, 1))
    assert len(first) == len(second) == (TINY_TRAIN - VALIDATION_IMAGES) // 2
    assert len(set(first.tolist()) | set(second.tolist())) == len(first) + len(second)


def test_a_lost_ddp_peer_in_the_final_test_ends_in_one_error_line_and_keeps_the_checkpoints(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)

    def test(*args, **kwargs):
        raise dist.DistNetworkError("Connection reset by peer")

    monkeypatch.setattr(pl.Trainer, "test", test)
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"]) == 1
    out, err = capsys.readouterr()
    assert len(errors_of(err)) == 1 and "Test accuracy" not in out
    checkpoints = list((tmp_path / "lightning_logs").rglob("*.ckpt"))
    assert checkpoints  # the training done is kept
    for checkpoint in checkpoints:
        assert torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] > 0


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
