"""Any input, any environment: one true `error:` line that names what the user gave, never a
traceback or a hang. Each class of input (data files, checkpoints, writes, output streams,
settings of the environment) is tried with generated cases, not only the ones named in issues."""

import errno
import gzip
import io
import math
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import SCRIPT, run_in, run_script
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lightning_mnist
from lightning_mnist import (
    AtomicCheckpointIO,
    LitNeuralNet,
    RunError,
    gunzip,
    main,
    read_checkpoint,
    read_idx,
    shown,
)

FIXTURES = [HealthCheck.function_scoped_fixture]  # each example overwrites the same files, on purpose


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


## IDX files and their .gz: generated, then damaged


def idx_bytes(kind: str, sizes: list[int], values: bytes) -> bytes:
    """An IDX file as MNIST's are: magic number, big-endian sizes, one byte a value."""
    magic = 0x803 if kind == "images" else 0x801
    return struct.pack(f">I{len(sizes)}I", magic, *sizes) + values


@st.composite
def idx_files(draw) -> tuple[str, bytes]:
    """An intact MNIST file of a few images or labels, of either kind."""
    kind = draw(st.sampled_from(["images", "labels"]))
    sizes = [draw(st.integers(1, 4))] + ([draw(st.integers(1, 5)), draw(st.integers(1, 5))] if kind == "images" else [])
    return kind, idx_bytes(kind, sizes, draw(st.binary(min_size=math.prod(sizes), max_size=math.prod(sizes))))


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


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


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


@pytest.mark.parametrize("kind", NOT_FILES)
def test_only_regular_files_are_read_and_anything_else_is_named_at_once(kind, tmp_path):
    for reader, name in [
        (lambda path: read_idx(path, "labels"), "train-labels-idx1-ubyte"),
        (lambda path: gunzip(path, tmp_path / "unpacked", "images"), "train-images-idx3-ubyte.gz"),
        (read_checkpoint, "last.ckpt"),
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


@pytest.fixture
def data(tiny_mnist, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny MNIST to damage, in the working folder; its MNIST/raw folder."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_mnist, tmp_path / "data")
    return tmp_path / "data" / "MNIST" / "raw"


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


## Checkpoints: generated damage, one error line


@pytest.fixture(scope="module")
def small_checkpoint() -> bytes:
    """A checkpoint of this script's model, as Lightning saves its weights and hyperparameters, in bytes."""
    model = LitNeuralNet(hidden_size=4)
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, buffer)
    return buffer.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data())
def test_a_damaged_checkpoint_is_read_whole_or_refused_with_its_name(data, small_checkpoint, scratch):
    path = scratch / "damaged.ckpt"
    content = data.draw(damaged(small_checkpoint))
    path.write_bytes(content)
    with within(20):
        try:
            hparams = read_checkpoint(str(path))
        except RunError as error:
            assert str(error).startswith(f"{path} ") and "\n" not in str(error)
            return
    # Read whole: what it holds is this script's model, as written (the zip archive survived the damage).
    assert hparams == dict(LitNeuralNet(hidden_size=4).hparams)


def hyperparameter_damage():
    """A checkpoint's hyperparameters, each changed as a flipped byte or a hand edit could: a name, a type, a value."""
    values = st.one_of(st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=3), st.booleans(), st.none())
    names = st.sampled_from(list(LitNeuralNet(hidden_size=4).hparams))
    return st.lists(st.tuples(names, st.sampled_from(["rename", "retype"]), values, st.text(min_size=1, max_size=12)),
                    min_size=1, max_size=3)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(changes=hyperparameter_damage())
@example(changes=[("hidden_size", "retype", -4, "")])  # a size that makes no weights
@example(changes=[("num_classes", "rename", 0, "oum_classes")])  # a flipped byte that a hypothesis run found
def test_damaged_hyperparameters_are_refused_in_one_line_or_make_the_model(changes, scratch):
    model = LitNeuralNet(hidden_size=4)
    hparams = dict(model.hparams)
    for name, change, value, new_name in changes:
        if name in hparams:
            hparams[new_name if change == "rename" else name] = hparams.pop(name) if change == "rename" else value
    path = scratch / "edited\n.ckpt"  # a newline in the name: the one line of an error writes it as backslash, n
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    try:
        read = read_checkpoint(str(path))
    except RunError as error:
        assert str(error).startswith(str(path).replace("\n", "\\n") + " ") and "\n" not in str(error)
        return
    # Accepted: only what builds this very model, with LitNeuralNet's own names and types.
    rebuilt = LitNeuralNet(**read)
    assert {name: type(value) for name, value in read.items()} == {name: type(hparams[name]) for name in read}
    assert {name: value.shape for name, value in rebuilt.state_dict().items()} == {
        name: value.shape for name, value in model.state_dict().items()
    }


class Reached(Exception):
    """main() went past reading the checkpoint: the test stops it there."""


@settings(max_examples=12, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data())
def test_main_given_a_damaged_checkpoint_prints_one_error_line(data, small_checkpoint, tiny_mnist, scratch, capsys):
    path = scratch / "damaged.ckpt"
    path.write_bytes(data.draw(damaged(small_checkpoint)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(scratch)
        monkeypatch.setattr(lightning_mnist, "build_trainer", lambda args: (_ for _ in ()).throw(Reached()))
        try:
            read_checkpoint(str(path))
            readable = True
        except RunError:
            readable = False
        capsys.readouterr()
        if readable:
            with pytest.raises(Reached):
                main(["--data-dir", str(tiny_mnist), "--ckpt-path", str(path)])
        else:
            error = one_error_line(capsys, main(["--data-dir", str(tiny_mnist), "--ckpt-path", str(path)]))
            assert error.startswith(f"error: {path} ")


## Writes: the OS's own reason reaches the error line


class FailingFile:
    """A file opened for writing whose writes fail with errno after `after` bytes, as a disk does."""

    def __init__(self, path, mode, failure: int, after: int) -> None:
        self.file, self.failure, self.left = open(path, mode), failure, after  # noqa: SIM115

    def write(self, data) -> int:
        if len(data) > self.left:
            raise OSError(self.failure, os.strerror(self.failure))
        self.left -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO])
def test_a_failed_checkpoint_write_says_the_os_reason_and_keeps_the_old_checkpoint(failure, tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = {"state_dict": LitNeuralNet(hidden_size=4).state_dict()}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    before = path.read_bytes()
    # A failure after the first bytes, which torch.save turns into a RuntimeError of its own.
    monkeypatch.setattr(lightning_mnist, "open", lambda *args: FailingFile(*args, failure, 100), raising=False)
    with pytest.raises(RunError) as raised:
        AtomicCheckpointIO().save_checkpoint({**checkpoint, "epoch": 1}, path)
    message = str(raised.value)
    assert message.startswith(f"could not write the checkpoint {path}: {os.strerror(failure)}")
    assert ("MiB free on its disk" in message) == (failure in (errno.ENOSPC, errno.EDQUOT))
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.ckpt"]


def test_a_file_size_limit_is_named_as_such(tiny_mnist, tmp_path):
    limit = 2**20  # under a checkpoint of the default model (4.8 MB), over everything written before it

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data-dir", str(tiny_mnist), "--max-epochs", "1"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: could not write the checkpoint ")
    assert errors[0].endswith(": File too large. The checkpoints written before are whole.")
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]


## Output streams


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory) -> Path:
    """A folder with a run's lightning_logs (a model of 16 hidden units) and two pictures: a digit and a blank."""
    from PIL import Image

    argv = ["--data-dir", str(tiny_mnist), "--max-epochs", "1", "--hidden-size", "16"]
    folder = run_in(tmp_path_factory.mktemp("trained"), argv)
    digit = Image.new("L", (28, 28))
    digit.paste(255, (10, 5, 16, 20))
    digit.save(folder / "digit.png")
    Image.new("L", (28, 28)).save(folder / "blank.png")
    return folder


def run_with(args: list[str], cwd: Path, closed: int | None = None, stdout=subprocess.PIPE, env=None):
    """The script as a user runs it, with file descriptor `closed` (1: stdout, 2: stderr) closed."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=300,
        preexec_fn=(lambda: os.close(closed)) if closed else None, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_training_with_stdout_closed_is_refused_before_it_starts(tiny_mnist, tmp_path):
    result = run_with(["--data-dir", str(tiny_mnist), "--max-epochs", "1"], tmp_path, closed=1)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1] == (
        "error: stdout is closed, and the results would be lost: send it to a file, or to /dev/null."
    )
    assert b"Traceback" not in result.stderr and not (tmp_path / "lightning_logs").exists()


def test_predictions_that_cannot_be_written_end_with_an_error_and_a_failing_status(trained):
    closed = run_with(["--predict", "digit.png"], trained, closed=1)
    assert closed.returncode == 1 and closed.stderr.decode().splitlines()[-1].startswith("error: stdout is closed")
    reader, writer = os.pipe()
    os.close(reader)  # `| head -1` after it has read its line: every write is a broken pipe
    try:
        broken = run_with(["--predict", "digit.png", "digit.png"], trained, stdout=writer)
    finally:
        os.close(writer)
    assert broken.returncode == 1
    assert broken.stderr.decode().splitlines()[-1] == (
        "error: could not write to stdout (Broken pipe), so the results printed there are incomplete."
    )
    assert b"Traceback" not in broken.stderr and b"Exception ignored" not in broken.stderr


class FullStream(io.StringIO):
    """A stdout on a full disk."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_run_whose_results_cannot_be_written_never_claims_success(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", FullStream())
    error = one_error_line(capsys, main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"]))
    assert (
        error
        == "error: could not write to stdout (No space left on device), so the results printed there are incomplete."
    )


def test_with_stderr_closed_stdout_holds_the_answers_alone(trained):
    result = run_with(["--predict", "digit.png", "blank.png"], trained, closed=2)
    assert result.returncode == 1  # the blank could not be read, which the exit status still says
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("digit.png: ")


def test_a_path_prints_the_same_way_in_its_answer_and_in_its_error(trained, tmp_path):
    newline, undecodable = "new\nline.png", os.fsdecode(b"caf\xe9.png")  # Latin-1, not UTF-8
    for name in (newline, undecodable):
        shutil.copy(trained / "digit.png", trained / name)
        shutil.copy(trained / "blank.png", trained / f"blank {name}")
    result = run_with(
        ["--predict", newline, undecodable, f"blank {newline}", f"blank {undecodable}"],
        trained, env={"PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    out, err = result.stdout.decode().splitlines(), result.stderr.decode().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr.decode()
    assert [line.split(": ")[0] for line in out] == ["new\\nline.png", "caf\\xe9.png"]
    assert [line for line in err if line.startswith("error: ")] == [
        "error: blank new\\nline.png: nothing but background: no digit found",
        "error: blank caf\\xe9.png: nothing but background: no digit found",
    ]


def unshown(text: str) -> str:
    """The text that shown() printed as text, read back: proof that no two texts print the same."""
    result, raw, index = [], b"", 0
    while index < len(text):
        if text[index] == "\\" and text[index + 1] == "x":
            raw += bytes.fromhex(text[index + 2 : index + 4])
            index += 4
            continue
        if raw:
            result.append(raw.decode(sys.getfilesystemencoding(), "surrogateescape"))
            raw = b""
        if text[index] == "\\":
            escape = text[index + 1]
            if escape == "u":
                result.append(chr(int(text[index + 2 : index + 6], 16)))
                index += 6
                continue
            result.append({"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}[escape])
            index += 2
        else:
            result.append(text[index])
            index += 1
    if raw:
        result.append(raw.decode(sys.getfilesystemencoding(), "surrogateescape"))
    return "".join(result)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None), max_size=20), encoding=st.sampled_from(["utf-8", "ascii"]))
def test_any_text_is_shown_on_one_printable_line_that_reads_back_as_it(text, encoding):
    streams = [io.TextIOWrapper(io.BytesIO(), encoding=encoding) for _ in range(2)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "stdout", streams[0])
        monkeypatch.setattr(sys, "stderr", streams[1])
        line = shown(text)
    assert line.isprintable()
    line.encode(encoding)  # raises if the stream cannot take it
    assert unshown(line) == text


## The environment


def test_warnings_made_errors_by_the_environment_do_not_stop_a_run(tiny_mnist, tmp_path):
    # --limit-train-batches 3 is fewer batches than the logging interval, which Lightning warns about.
    result = run_script("--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "3",
                        cwd=tmp_path, env={"PYTHONWARNINGS": "error"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test accuracy: " in result.stdout and "smaller than the logging interval" in result.stderr
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))


def test_a_warning_nobody_expected_made_an_error_is_one_line(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    training_step = LitNeuralNet.training_step

    def training_step_that_warns(self, batch, batch_idx):
        warnings.warn("a warning of a newer library", FutureWarning, stacklevel=1)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LitNeuralNet, "training_step", training_step_that_warns)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", append=True)  # where PYTHONWARNINGS=error puts it: after the script's
        error = one_error_line(capsys, main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"]))
    assert error.startswith("error: FutureWarning: a warning of a newer library (a warning, which PYTHONWARNINGS")
    for run in tmp_path.glob("lightning_logs/*"):  # no run folder is left without a checkpoint
        assert list(run.glob("checkpoints/*.ckpt"))


def test_a_deleted_working_folder_is_named_before_torch_is_imported(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--fast-dev-run"],
        check=False, cwd=folder, capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: os.rmdir(folder), env={**os.environ, "PWD": str(folder)},
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"error: the working folder {folder} no longer exists: cd into a folder that does.\n"


def test_an_unreadable_working_folder_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    listdir = os.listdir

    def refuse(path="."):  # as the file system refuses a user other than root
        if Path(path).resolve() == tmp_path.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse)
    error = one_error_line(capsys, main(["--predict", "digit.png"]))
    assert (
        error
        == f"error: the working folder {tmp_path} cannot be read (Permission denied): cd into a folder you can read."
    )
