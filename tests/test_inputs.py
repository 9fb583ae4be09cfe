"""Any input, any environment: one true `error:` line that names what the user gave, never a
traceback or a hang. Each class of input (data files, checkpoints, writes, output streams,
settings of the environment) is tried with generated cases, not only the ones named in issues."""

import errno
import io
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, SCRIPT, damaged, one_error_line, run_in, run_script, within
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lightning_mnist
import mnist_kit.checkpoints
from lightning_mnist import LitNeuralNet, main
from mnist_kit.checkpoints import AtomicCheckpointIO, read_checkpoint
from mnist_kit.errors import RunError, shown

## IDX files and their .gz: generated, then damaged


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
            hparams = read_checkpoint(str(path), LitNeuralNet)
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
        read = read_checkpoint(str(path), LitNeuralNet)
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
            read_checkpoint(str(path), LitNeuralNet)
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
    monkeypatch.setattr(mnist_kit.checkpoints, "open", lambda *args: FailingFile(*args, failure, 100), raising=False)
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


def test_a_newline_tab_and_return_are_shown_as_their_escapes():
    assert shown("a\nb\tc\rd\\e") == "a\\nb\\tc\\rd\\\\e"
    assert shown("\x00\x7f") == "\\x00\\x7f"


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
