"""Shared fixtures: a tiny, learnable MNIST written in the real IDX format.

The files are read back through torchvision's own MNIST loader, so every test goes
through the same code path as a real run; only the pictures are made up. For --predict,
an MNIST of digits drawn with a font, a run trained on it, and the forms in which a
person's pictures of digits come.
"""

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

import lightning_mnist
from lightning_mnist import main

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


def write_mnist(root: Path, train: int = TINY_TRAIN, test: int = TINY_TEST, digits=make_digits) -> Path:
    """Write the four MNIST files under root/MNIST/raw, as torchvision expects them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 0), ("t10k", test, 1)):
        images, labels = digits(count, seed)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """A data folder with a tiny MNIST; read-only by convention (copy it to alter files)."""
    return write_mnist(tmp_path_factory.mktemp("tiny_mnist"))


def pytest_configure(config: pytest.Config) -> None:
    # Say why a test skipped (real MNIST or a GPU missing) without -rs: a skip is not a pass.
    chars = config.option.reportchars
    if not {"s", "a", "A", "N"} & set(chars):
        config.option.reportchars = chars + "s"


def real_mnist_folder(root: Path = ROOT) -> tuple[Path | None, str]:
    """The folder holding the real MNIST/raw/, from MNIST_DATA_DIR or else ./data of the repository
    (where a run of the script downloads it); or None and why not."""
    named = os.environ.get("MNIST_DATA_DIR")
    folder = Path(named) if named else root / "data"
    if all((folder / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
        return folder.resolve(), ""
    where = f"MNIST_DATA_DIR={named}" if named else "./data (MNIST_DATA_DIR is not set)"
    return None, f"real MNIST needed: {where} holds no MNIST/raw/; run the script once, or set MNIST_DATA_DIR"


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The real MNIST (see real_mnist_folder), or skip."""
    folder, why_not = real_mnist_folder()
    if folder is None:
        pytest.skip(why_not)
    return folder


@pytest.fixture(scope="session")
def real_default_run(real_mnist, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python lightning_mnist.py` with its defaults on the real MNIST: the folder it ran in, and its result."""
    cwd = tmp_path_factory.mktemp("real_default_run")
    return cwd, run_script("--data-dir", str(real_mnist), cwd=cwd, timeout=600)


@pytest.fixture
def four_gpus(monkeypatch):
    """Make torch, and so Lightning, see four CUDA GPUs; enough to build a Trainer, not to train."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


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


def run_in(folder: Path, argv: list[str], *callbacks: pl.Callback) -> Path:
    """A run of main(argv) that finished in folder, these callbacks added to its Trainer: the folder,
    which holds its lightning_logs. For the fixtures that share one trained run between tests."""

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(folder)
        trainers_with(monkeypatch, *callbacks)
        assert lightning_mnist.main(argv) == 0
    return folder


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """Work in a temporary folder, where a run may make lightning_logs; undo what a Trainer sets for torch."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    torch.use_deterministic_algorithms(False)


def trainers_with(monkeypatch, *callbacks: pl.Callback) -> list[pl.Trainer]:
    """Make main() add these callbacks to its Trainer; the list it returns receives that Trainer."""

    trainers = []
    build_trainer = lightning_mnist.build_trainer

    def build_with_callbacks(args):
        trainer = build_trainer(args)
        trainer.callbacks.extend(callbacks)
        trainers.append(trainer)
        return trainer

    monkeypatch.setattr(lightning_mnist, "build_trainer", build_with_callbacks)
    return trainers


## Digits as people draw them, for --predict


def drawn_digit(digit: int, generator: torch.Generator) -> Image.Image:
    """A digit written with a font, light on black, of a random size, weight, slant and rotation."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    font = ImageFont.load_default(size=round(uniform(60, 90)))
    canvas = Image.new("L", (160, 160))
    weight = round(uniform(1, 5))
    ImageDraw.Draw(canvas).text(
        (80, 80), str(digit), fill=255, font=font, anchor="mm", stroke_width=weight, stroke_fill=255
    )
    slant = (1, uniform(-0.3, 0.3), 0, 0, 1, 0)
    canvas = canvas.transform(canvas.size, Image.Transform.AFFINE, slant, resample=Image.Resampling.BILINEAR)
    return canvas.rotate(uniform(-15, 15), resample=Image.Resampling.BILINEAR)


def mnist_style(picture: Image.Image) -> torch.Tensor:
    """A light-on-black drawing made into an MNIST image as MNIST's authors describe it: cropped, scaled
    to fit 20x20 with its aspect ratio kept, and placed in 28x28 with its centre of mass at (14, 14).
    Written apart from lightning_mnist.prepare_digit, with Pillow and numpy, so that it can check it."""
    digit = picture.crop(picture.getbbox())
    scale = 20 / max(digit.size)
    digit = digit.resize([max(1, round(side * scale)) for side in digit.size], Image.Resampling.LANCZOS)
    pixels = np.asarray(digit, dtype=np.float64)
    row = (pixels.sum(axis=1) * np.arange(pixels.shape[0])).sum() / pixels.sum()
    column = (pixels.sum(axis=0) * np.arange(pixels.shape[1])).sum() / pixels.sum()
    image = Image.new("L", (28, 28))
    image.paste(digit, (round(14 - column), round(14 - row)))
    return torch.from_numpy(np.array(image))


def make_drawn_digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-style images of digits drawn with a font, each digit as often as the others."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=generator)]
    images = torch.stack([mnist_style(drawn_digit(label, generator)) for label in labels.tolist()])
    return images, labels


@pytest.fixture(scope="session")
def drawn_mnist(tmp_path_factory) -> Path:
    """A data folder with an MNIST of font-drawn digits: 1,100 to train, 100 to validate, 200 to test."""
    return write_mnist(tmp_path_factory.mktemp("drawn_mnist"), train=1200, test=200, digits=make_drawn_digits)


@pytest.fixture(scope="session")
def drawn_run(drawn_mnist, tmp_path_factory) -> Path:
    """A folder in which `python lightning_mnist.py` has trained on the drawn digits: it holds lightning_logs."""
    return run_in(tmp_path_factory.mktemp("drawn_run"), ["--data-dir", str(drawn_mnist), "--max-epochs", "10"])


def digit_forms(image: torch.Tensor) -> dict[str, Image.Image]:
    """An MNIST-style digit (28x28, light on black) as a person's pictures of digits come."""
    light = Image.fromarray(image.numpy())
    dark = Image.fromarray(255 - image.numpy())
    # Dark on white, 4 times as large, off-centre on a page, in colour.
    page = Image.new("RGB", (320, 240), "white")
    page.paste(dark.resize((112, 112), Image.Resampling.BILINEAR), (30, 100))
    # Black strokes on transparent pixels (which are black too), as drawing programs export them:
    # only the alpha channel shows the digit.
    strokes = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    strokes.paste(
        Image.new("RGBA", (140, 140), "black"), (100, 20), light.resize((140, 140), Image.Resampling.BILINEAR)
    )
    return {"light_on_dark.png": light, "dark_on_white_off_centre.jpg": page, "strokes_on_transparent.png": strokes}


def write_digit_forms(image: torch.Tensor, folder: Path, name: str) -> dict[str, Path]:
    """Write an MNIST-style digit in each form of digit_forms, as folder/NAME_FORM; the paths by form."""
    paths = {}
    for form, picture in digit_forms(image).items():
        paths[form] = folder / f"{name}_{form}"
        picture.save(paths[form])
    return paths


def errors_of(err: str) -> list[str]:
    """The `error:` lines on stderr; there must be no traceback."""
    assert "Traceback" not in err, err[-3000:]
    return [line for line in err.splitlines() if line.startswith("error:")]


def read_events(run_folder: Path) -> EventAccumulator:
    """Every scalar and image in a run's event files (EventAccumulator keeps only a sample by default)."""
    events = EventAccumulator(str(run_folder), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    return events


@contextmanager
def within(seconds: float):
    """Fail, rather than hang the test suite, when the block takes longer than seconds."""

    def stop(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_error_line(capsys, status: int) -> str:
    """main's status must be 1 with one `error:` line on stderr, nothing on stdout but results; the line."""
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert status == 1 and len(errors) == 1, (status, captured.err[-3000:])
    assert "Traceback" not in captured.err + captured.out and "error:" not in captured.out
    return errors[0]


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


DDP = ("--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")


VALIDATION_IMAGES = round(TINY_TRAIN / 12)  # the tiny MNIST's held-out images


FIXTURES = [HealthCheck.function_scoped_fixture]  # each example overwrites the same files, on purpose


@st.composite
def damaged(draw, content: bytes) -> bytes:
    """content cut short, extended, with bytes flipped, or with its start overwritten."""
    how = draw(st.sampled_from(["truncate", "extend", "flip", "overwrite", "intact"]))
    if how == "truncate":
        return content[: draw(st.integers(0, len(content) - 1))]
    if how == "extend":
        return content + draw(st.binary(min_size=1, max_size=20))
    if how == "flip":
        mutable = bytearray(content)
        for index in draw(st.lists(st.integers(0, len(content) - 1), min_size=1, max_size=4)):
            mutable[index] ^= draw(st.integers(1, 255))
        return bytes(mutable)
    if how == "overwrite":
        start = draw(st.binary(min_size=1, max_size=24))
        return start + content[len(start) :]
    return content


@pytest.fixture
def data(tiny_mnist, in_tmp_path) -> Path:
    """A copy of the tiny MNIST to damage; its MNIST/raw folder."""
    shutil.copytree(tiny_mnist, in_tmp_path / "data")
    return in_tmp_path / "data" / "MNIST" / "raw"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    """A folder where a 1-epoch run of the tiny MNIST finished: lightning_logs/version_0."""
    return run_in(tmp_path_factory.mktemp("finished_run"), ["--data-dir", str(tiny_mnist), "--max-epochs", "1"])
