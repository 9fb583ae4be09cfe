"""Trust and scale: resuming after an interruption, bit-identical reruns, DDP across
processes and machines, runs that never overwrite each other, and wrong data files."""

import shutil
from pathlib import Path

import pytest
from conftest import (
    TINY_TEST,
    TINY_TRAIN,
    make_digits,
    write_idx_images,
    write_idx_labels,
)

from lightning_mnist import main

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
