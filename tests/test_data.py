"""MNIST in memory and its files: the IDX reader and the .gz unpacker give the data or say what
is wrong, with generated files; anything that is not a regular file is refused at once; each
wrong, missing or damaged MNIST file is named before training starts."""

import gzip
import math
import os
import shutil
import socket
import struct
import zlib
from pathlib import Path

import pytest
import torch
from conftest import (
    FIXTURES,
    TINY_TEST,
    TINY_TRAIN,
    damaged,
    fails,
    make_digits,
    one_error_line,
    within,
    write_idx_images,
    write_idx_labels,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import mnist_kit.data
from lightning_mnist import LitNeuralNet, main, prepare_digit
from mnist_kit.checkpoints import read_checkpoint
from mnist_kit.data import gunzip, read_idx
from mnist_kit.digits import PictureError
from mnist_kit.errors import RunError


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


@st.composite
def idx_files(draw) -> tuple[str, bytes]:
    """An intact MNIST file of a few images or labels, of either kind."""
    kind = draw(st.sampled_from(["images", "labels"]))
    sizes = [draw(st.integers(1, 4))] + ([draw(st.integers(1, 5)), draw(st.integers(1, 5))] if kind == "images" else [])
    return kind, idx_bytes(kind, sizes, draw(st.binary(min_size=math.prod(sizes), max_size=math.prod(sizes))))


def expected_idx(content: bytes, kind: str) -> torch.Tensor | None:
    """The tensor an intact MNIST file of kind holds, read here on the format's own terms; None if it is not one."""
    dimensions = 3 if kind == "images" else 1
    header = 4 + 4 * dimensions
    if len(content) < header or struct.unpack(">I", content[:4])[0] != (0x803 if kind == "images" else 0x801):
        return None
    sizes = struct.unpack(f">{dimensions}I", content[4:header])
    if sizes[0] == 0 or len(content) != header + math.prod(sizes):
        return None
    return torch.tensor(list(content[header:]), dtype=torch.uint8).reshape(sizes)


def make_not_a_file(path: Path, kind: str) -> None:
    """Something other than a regular file at path."""
    if kind == "a named pipe (FIFO)":
        os.mkfifo(path)
    elif kind == "a folder":
        path.mkdir()
    elif kind == "a character device":
        path.symlink_to(os.devnull)  # endless when read as /dev/zero is; /dev/null is one too
    elif kind == "a socket":
        here = Path.cwd()
        os.chdir(path.parent)  # a socket's path is limited to about 100 bytes
        try:
            server = socket.socket(socket.AF_UNIX)
            server.bind(path.name)
            server.close()
        finally:
            os.chdir(here)


NOT_FILES = ["a named pipe (FIFO)", "a folder", "a character device", "a socket"]


def idx_bytes(kind: str, sizes: list[int], values: bytes) -> bytes:
    """An IDX file as MNIST's are: magic number, big-endian sizes, one byte a value."""
    magic = 0x803 if kind == "images" else 0x801
    return struct.pack(f">I{len(sizes)}I", magic, *sizes) + values


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


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data(), original=idx_files())
def test_the_idx_reader_returns_the_data_or_says_what_is_wrong_with_the_file(data, original, scratch):
    kind, intact = original
    content = data.draw(damaged(intact))
    path = scratch / "file-idx-ubyte"
    path.write_bytes(content)
    expected = expected_idx(content, kind)
    with within(10):
        if expected is not None:
            assert torch.equal(read_idx(path, kind), expected)
            return
        with pytest.raises(RunError) as raised:
            read_idx(path, kind)
    message = str(raised.value)
    assert message.startswith(f"{path} ") and message.endswith("or delete it to download MNIST again.")
    if content[:4] == intact[:4] and len(content) >= 4 + 4 * (3 if kind == "images" else 1):
        promised = len(intact) if content[4:16] == intact[4:16] else None
        if promised is not None and len(content) != promised:  # cut short or too long: both sizes, exactly
            assert f" is {len(content):,} bytes, where its header promises {promised:,}." in message


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data(), original=idx_files(), packed_damage=st.booleans())
def test_a_gz_file_is_unpacked_whole_or_named_with_what_it_holds(data, original, packed_damage, scratch):
    kind, intact = original
    folder = scratch / "gz"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    archive, target = folder / "t10k-data-ubyte.gz", folder / "t10k-data-ubyte"
    content = intact if packed_damage else data.draw(damaged(intact))
    packed = gzip.compress(content, mtime=0)
    archive.write_bytes(data.draw(damaged(packed)) if packed_damage else packed)
    try:
        unpacked = gzip.decompress(archive.read_bytes())
    except (OSError, EOFError, zlib.error):  # not gzip, cut short, damaged
        unpacked = None
    with within(10):
        if unpacked is not None and expected_idx(unpacked, kind) is not None:
            gunzip(archive, target, kind)
            assert target.read_bytes() == unpacked
            return
        with pytest.raises(RunError) as raised:
            gunzip(archive, target, kind)
    message = str(raised.value)
    assert message.startswith(f"{archive} ")  # the file the user gave, never the one unpacked from it
    if unpacked is not None:
        assert message.startswith(f"{archive} holds {len(unpacked):,} bytes that are not an MNIST {kind} file: ")
    assert sorted(path.name for path in folder.iterdir()) == [archive.name]  # nothing half-unpacked


@pytest.mark.parametrize("kind", NOT_FILES)
def test_only_regular_files_are_read_and_anything_else_is_named_at_once(kind, tmp_path):
    for reader, name in [
        (lambda path: read_idx(path, "labels"), "train-labels-idx1-ubyte"),
        (lambda path: gunzip(path, tmp_path / "unpacked", "images"), "train-images-idx3-ubyte.gz"),
        (lambda path: read_checkpoint(path, LitNeuralNet), "last.ckpt"),
    ]:
        path = tmp_path / name
        make_not_a_file(path, kind)
        with within(10), pytest.raises(RunError, match=f"^{path} is {kind.replace('(', '.').replace(')', '.')}, not"):
            reader(path)
        assert not (tmp_path / "unpacked").exists()


def test_a_file_swapped_for_a_fifo_after_the_check_is_still_refused_without_waiting(tmp_path, monkeypatch):
    regular, fifo = tmp_path / "regular", tmp_path / "train-labels-idx1-ubyte"
    regular.write_bytes(b"")
    os.mkfifo(fifo)
    stat = os.stat
    # What a path swapped between the check and the opening looks like: the check sees a file.
    monkeypatch.setattr(os, "stat", lambda path, **kwargs: stat(regular if Path(path) == fifo else path, **kwargs))
    with within(10), pytest.raises(RunError, match=rf"^{fifo} is a named pipe \(FIFO\), not a file\."):
        read_idx(fifo, "labels")


def test_a_fifo_in_place_of_an_mnist_file_is_named_not_waited_on(data, capsys):
    labels = data / "t10k-labels-idx1-ubyte"
    labels.unlink()
    os.mkfifo(labels)
    with within(60):
        error = one_error_line(capsys, main(["--data-dir", str(data.parents[1]), "--fast-dev-run"]))
    assert error == (
        f"error: {labels} is a named pipe (FIFO), not a file. "
        "Replace it with an intact copy, or delete it to download MNIST again."
    )


@pytest.mark.parametrize("extra", [1, -1, 7])
def test_an_mnist_file_of_the_wrong_size_says_both_sizes(extra, data, capsys):
    images = data / "train-images-idx3-ubyte"
    content = images.read_bytes()
    images.write_bytes(content[:extra] if extra < 0 else content + bytes(extra))
    error = one_error_line(capsys, main(["--data-dir", str(data.parents[1]), "--fast-dev-run"]))
    size = len(content) + extra
    assert error.startswith(f"error: {images} is {size:,} bytes, where its header promises {len(content):,}. ")


def test_a_gz_of_the_wrong_content_is_named_not_the_file_unpacked_from_it(data, capsys):
    images = data / "train-images-idx3-ubyte"
    labels = (data / "train-labels-idx1-ubyte").read_bytes()
    (data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(labels))  # the labels, under the images' name
    images.unlink()
    error = one_error_line(capsys, main(["--data-dir", str(data.parents[1]), "--fast-dev-run"]))
    assert error.startswith(
        f"error: {images}.gz holds {len(labels):,} bytes that are not an MNIST images file: unpacked, it starts "
        "with 0x00000801, where MNIST images files start with 0x00000803."
    )
    assert sorted(path.name for path in data.iterdir() if "train-images" in path.name) == [f"{images.name}.gz"]


## Inputs read with a bound: nothing the script reads can make it read forever or fill the memory


def endless(path: Path, kind: str, monkeypatch) -> None:
    """Put at path an input that would never end, or one that changes as it is read."""
    if kind == "a character device":
        path.symlink_to("/dev/zero")
    elif kind == "a file the system makes up as it is read":
        path.symlink_to("/proc/self/status")  # a regular file that says it holds 0 bytes
    else:  # a file that grows while it is read: it is larger than its size when it was opened
        path.write_bytes(b"\0" * 4096)
        fstat = os.fstat
        monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*fstat(fd)[:6], 1024, *fstat(fd)[7:])))


READERS = {
    "MNIST file": lambda path: read_idx(path, "labels"),
    ".gz file": lambda path: gunzip(path, path.with_name("unpacked"), "images"),
    "checkpoint": lambda path: read_checkpoint(path, LitNeuralNet),
    "picture": lambda path: prepare_digit(path),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "kind", ["a character device", "a file the system makes up as it is read", "a file that grows while it is read"]
)
def test_an_endless_or_growing_input_is_named_and_refused_at_once(reader, kind, tmp_path, monkeypatch):
    path = tmp_path / "input"
    endless(path, kind, monkeypatch)
    with within(10), pytest.raises((RunError, PictureError)) as raised:
        READERS[reader](path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    if kind == "a character device":
        assert "a character device, not a file" in message
    else:
        assert "changed size while it was read" in message
    assert not (tmp_path / "unpacked").exists()


def test_a_gz_file_that_unpacks_to_more_than_any_mnist_file_is_refused_without_unpacking_it(tmp_path):
    archive = tmp_path / "train-images-idx3-ubyte.gz"
    archive.write_bytes(gzip.compress(b"\0" * (mnist_kit.data.MNIST_FILE_LIMIT + 1), compresslevel=1))
    with within(30), pytest.raises(RunError, match=r"unpacks to more than 268,435,456 bytes, more than any MNIST"):
        gunzip(archive, tmp_path / "train-images-idx3-ubyte", "images")
    assert sorted(tmp_path.iterdir()) == [archive]
