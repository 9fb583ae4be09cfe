"""Shared fixtures: a tiny, learnable MNIST written in the real IDX format.

The files are read back through torchvision's own MNIST loader, so every test goes
through the same code path as a real run; only the pictures are made up.
"""

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "lightning_mnist.py"
sys.path.insert(0, str(ROOT))

TINY_TRAIN = 600  # 550 train + 50 validation images after the 1/12 split
TINY_TEST = 200
MNIST_FILES = {
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
}


def write_idx_images(path: Path, images: torch.Tensor) -> None:
    """IDX3: magic 0x00000803 (unsigned bytes, 3 dimensions), big-endian sizes, pixels."""
    count, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x803, count, rows, cols) + images.to(torch.uint8).numpy().tobytes())


def write_idx_labels(path: Path, labels: torch.Tensor) -> None:
    """IDX1: magic 0x00000801 (unsigned bytes, 1 dimension), big-endian size, labels."""
    path.write_bytes(struct.pack(">II", 0x801, len(labels)) + labels.to(torch.uint8).numpy().tobytes())


def make_digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 28x28 images in which digit k is a bright 6x6 square at a place of its own."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=generator)]
    images = torch.randint(0, 60, (count, 28, 28), generator=generator)
    for index, label in enumerate(labels.tolist()):
        row, col = 2 + 13 * (label // 5), 1 + 5 * (label % 5)
        images[index, row : row + 6, col : col + 6] = 255
    return images, labels


def write_mnist(root: Path, train: int = TINY_TRAIN, test: int = TINY_TEST) -> Path:
    """Write the four MNIST files under root/MNIST/raw, as torchvision expects them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = make_digits(count, seed)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """A data folder with a tiny MNIST; read-only by convention (copy it to alter files)."""
    return write_mnist(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture
def real_mnist() -> Path:
    """The real MNIST named by MNIST_DATA_DIR, or skip."""
    folder = os.environ.get("MNIST_DATA_DIR")
    if not folder or not all((Path(folder) / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
        pytest.skip("set MNIST_DATA_DIR to a folder holding MNIST/raw/ to run tests on real data")
    return Path(folder).resolve()


def run_script(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run lightning_mnist.py as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


ACCURACY_LINE = re.compile(r"^Test accuracy: (\d+\.\d\d)%$", re.MULTILINE)
BEST_LINE = re.compile(r"^Best checkpoint: (.+\.ckpt)$", re.MULTILINE)


def reported_accuracy(output: str) -> float:
    """The percentage on the script's `Test accuracy` line; there must be exactly one."""
    found = ACCURACY_LINE.findall(output)
    assert len(found) == 1, output
    return float(found[0])


def best_checkpoint(output: str) -> Path:
    """The path on the script's `Best checkpoint` line; there must be exactly one."""
    found = BEST_LINE.findall(output)
    assert len(found) == 1, output
    return Path(found[0])


def trainers_with(monkeypatch, *callbacks: pl.Callback) -> list[pl.Trainer]:
    """Make main() add these callbacks to its Trainer; the list it returns receives that Trainer."""
    import lightning_mnist

    trainers = []
    build_trainer = lightning_mnist.build_trainer

    def build_with_callbacks(args):
        trainer = build_trainer(args)
        trainer.callbacks.extend(callbacks)
        trainers.append(trainer)
        return trainer

    monkeypatch.setattr(lightning_mnist, "build_trainer", build_with_callbacks)
    return trainers
