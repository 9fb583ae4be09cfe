"""What a learner copies from the READMEs works as it stands: every ```python block of
README.md and README.zh-CN.md runs, in a fresh process, in a folder where the default run
(`python lightning_mnist.py`, on the tiny MNIST in ./data) has just been made. And
train_and_test, which those blocks call, takes the command line's flags as keywords; and the
tests find real MNIST and say why they skip, as the README's test section promises."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, SCRIPT, pytest_configure, real_mnist_folder, write_mnist
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_mnist import LitNeuralNet, Result, parse_args, train_and_test
from mnist_kit.flags import flags_to_argv

READMES = ["README.md", "README.zh-CN.md"]


def python_blocks(readme: str) -> list[str]:
    text = (ROOT / readme).read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def after_default_run(tiny_mnist, tmp_path_factory):
    """A folder after `python lightning_mnist.py` was run in it, as the README says to copy it for a project
    of one's own: the script and mnist_kit/ (nothing else of the repository), ./data and lightning_logs/version_0."""
    folder = tmp_path_factory.mktemp("copy")
    shutil.copy(SCRIPT, folder)
    shutil.copytree(ROOT / "mnist_kit", folder / "mnist_kit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_mnist, folder / "data")
    result = subprocess.run(
        [sys.executable, "lightning_mnist.py"], cwd=folder, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return folder


def run_block(block: str, folder) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", block], cwd=folder, capture_output=True, text=True, timeout=300, check=False
    )


def test_both_readmes_have_python_blocks_and_the_same_code():
    english, chinese = (python_blocks(readme) for readme in READMES)
    assert len(english) >= 2
    # The translation may change the comments, never the code a learner runs.
    assert [ast.dump(ast.parse(block)) for block in chinese] == [ast.dump(ast.parse(block)) for block in english]


@pytest.mark.parametrize("readme", READMES)
def test_every_python_block_runs_as_it_stands_after_a_default_run(readme, after_default_run):
    for block in python_blocks(readme):
        done = run_block(block, after_default_run)
        assert done.returncode == 0, f"{readme}:\n{block}\n{done.stderr[-3000:]}"
        if "train_and_test(" in block:
            # The run's own files: a new run folder, not version_0's, and its best checkpoint.
            accuracy, checkpoint, folder = done.stdout.splitlines()[-1].split(" ")
            assert float(accuracy.rstrip("%")) > 90  # the tiny MNIST is easy
            assert Path(folder).parent == (after_default_run / "lightning_logs").resolve()
            assert Path(folder).name != "version_0"  # a run of its own, after the default run's
            assert Path(checkpoint).parent == Path(folder) / "checkpoints" and Path(checkpoint).is_file()
        if "predict_step" in block:
            assert re.fullmatch(r"tensor\(\[\d\]\)\n", done.stdout)


def test_train_and_test_returns_the_runs_result_and_passes_every_flag_on(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = train_and_test(data_dir=str(tiny_mnist), max_epochs=1, hidden_size=20, lr=0.01, batch_size=50)
    assert isinstance(result, Result)
    assert result.run_folder == str(tmp_path / "lightning_logs" / "version_0")
    assert result.best_checkpoint.startswith(result.run_folder) and result.best_checkpoint.endswith(".ckpt")
    model = LitNeuralNet.load_from_checkpoint(result.best_checkpoint)
    assert (model.hparams.hidden_size, model.hparams.learning_rate, model.hparams.batch_size) == (20, 0.01, 50)
    assert torch.load(result.best_checkpoint, weights_only=True)["epoch"] == 0  # max_epochs=1: epoch 0 alone
    out = capsys.readouterr().out
    assert f"Test accuracy: {100 * result.test_acc:.2f}%" in out and "not a result" not in out


@pytest.mark.parametrize("batches", [True, 3])
def test_fast_dev_run_says_its_accuracy_is_no_result(batches, tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    result = train_and_test(data_dir=str(tiny_mnist), fast_dev_run=batches)
    assert (result.best_checkpoint, result.run_folder) == (None, None)
    assert list(tmp_path.iterdir()) == []  # fast_dev_run writes nothing
    out = capsys.readouterr().out
    count = 1 if batches is True else batches
    said = f"accuracy on {count} batch{'es' if count > 1 else ''} of test images after {count} batch"
    assert said in out and "not a result" in out


def test_train_and_test_refuses_what_the_command_line_refuses(tiny_mnist):
    with pytest.raises(TypeError, match="max_ep"):  # a prefix, which argparse would take for --max-epochs
        train_and_test(max_ep=1)
    with pytest.raises(TypeError, match="predict"):  # predicting is not training
        train_and_test(predict=["seven.png"])
    with pytest.raises(SystemExit) as refused:
        train_and_test(data_dir=str(tiny_mnist), batch_size=0)
    assert refused.value.code == 2


FLAG_VALUES = {
    "hidden_size": st.integers(1, 10_000),
    "lr": st.floats(1e-6, 10, allow_nan=False),
    "batch_size": st.integers(1, 1000),
    "data_dir": st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=8),
    "max_epochs": st.integers(1, 100) | st.just(-1),
    "fast_dev_run": st.booleans() | st.integers(0, 10),
    "gpus": st.none(),
    "lr_find": st.booleans(),
    "deterministic": st.booleans(),
    "seed": st.integers(0, 2**32 - 1),
    "limit_train_batches": st.integers(1, 100) | st.floats(0.01, 1.0),
    "precision": st.sampled_from(["32-true", "16-mixed", "bf16-mixed"]),
    "devices": st.integers(1, 8) | st.just("auto"),
}


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional=FLAG_VALUES))
def test_every_keyword_arrives_as_its_flag_would(flags):
    if flags.get("lr_find") is True and "lr" in flags:  # --lr-find chooses the rate itself: both are refused
        with pytest.raises(SystemExit):
            parse_args(flags_to_argv(flags, parse_args))
        return
    args = parse_args(flags_to_argv(flags, parse_args))
    for name, value in flags.items():
        dest = "learning_rate" if name == "lr" else name
        default = getattr(parse_args([]), dest)
        if value is True:  # a bare flag; --fast-dev-run alone means one batch
            expected = 1 if name == "fast_dev_run" else True
        elif value is False or value is None:  # left out
            expected = default
        else:
            expected = value
        assert getattr(args, dest) == expected, (name, value)


def test_real_mnist_is_found_in_data_when_mnist_data_dir_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_DATA_DIR", raising=False)
    folder, why_not = real_mnist_folder(tmp_path)
    assert folder is None and "./data" in why_not and "MNIST_DATA_DIR" in why_not
    write_mnist(tmp_path / "data", train=10, test=10)
    assert real_mnist_folder(tmp_path) == ((tmp_path / "data").resolve(), "")
    # MNIST_DATA_DIR, when set, is the one place looked at: a wrong one is said, not passed over.
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path / "elsewhere"))
    folder, why_not = real_mnist_folder(tmp_path)
    assert folder is None and str(tmp_path / "elsewhere") in why_not


@pytest.mark.parametrize(("asked", "shown"), [("fE", "fEs"), ("", "s"), ("fEs", "fEs"), ("N", "N"), ("a", "a")])
def test_skips_say_why_unless_the_reports_were_chosen(asked, shown):
    config = SimpleNamespace(option=SimpleNamespace(reportchars=asked))
    pytest_configure(config)
    assert config.option.reportchars == shown
