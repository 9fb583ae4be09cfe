"""Trust and scale: resuming after an interruption, bit-identical reruns, DDP across
processes and machines, runs that never overwrite each other, and wrong data files."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    SCRIPT,
    TINY_TEST,
    TINY_TRAIN,
    make_digits,
    write_idx_images,
    write_idx_labels,
)
from test_lightning_mnist import best_checkpoint

from lightning_mnist import ExclusiveTensorBoardLogger, main

## No lost work


def test_loggers_that_pick_their_version_at_once_each_get_a_folder_of_their_own(tmp_path):
    # Lightning's logger takes the highest version_N plus one, so two runs that look
    # before either has written anything take the same folder. This one claims it as it picks it.
    assert [pl.loggers.TensorBoardLogger(save_dir=tmp_path / "plain").version for _ in range(2)] == [0, 0]
    first, second = (ExclusiveTensorBoardLogger(save_dir=tmp_path) for _ in range(2))
    assert (first.version, second.version) == (0, 1)
    assert sorted(path.name for path in (tmp_path / "lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_loggers_of_other_ranks_create_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(pl.utilities.rank_zero.rank_zero_only, "rank", 1)
    assert ExclusiveTensorBoardLogger(save_dir=tmp_path).version == 0
    assert not (tmp_path / "lightning_logs").exists()


def test_runs_started_together_in_one_folder_keep_their_own_logs_and_checkpoints(tiny_mnist, tmp_path):
    earlier = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier run")
    flags = ("--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "2")
    runs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *flags, "--hidden-size", hidden_size],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for hidden_size in ("8", "16")
    ]
    outputs = [run.communicate(timeout=180)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    folders = set()
    for hidden_size, output in zip((8, 16), outputs, strict=True):
        folder = best_checkpoint(output).parent.parent
        folders.add(folder)
        for checkpoint in folder.glob("checkpoints/*.ckpt"):
            assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["hidden_size"] == hidden_size
        assert f"hidden_size: {hidden_size}\n" in (folder / "hparams.yaml").read_text()
    assert folders == {tmp_path / "lightning_logs" / f"version_{n}" for n in (1, 2)}
    assert earlier.read_text() == "an earlier run"


## Data files that torchvision reads but that are wrong


def damage_labels_out_of_range(raw: Path) -> str:
    _, labels = make_digits(TINY_TRAIN, seed=0)
    labels[17] = 12
    write_idx_labels(raw / "train-labels-idx1-ubyte", labels)
    return "holds labels up to 12; MNIST labels are 0-9"


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
