"""The script as a user runs it, in its own process: the default run, its output, its checkpoint, and real data."""

import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from conftest import SCRIPT, best_checkpoint, reported_accuracy, run_script
from test_tensorboard import read_events

from lightning_mnist import LitNeuralNet


@pytest.fixture(scope="module")
def default_run(tiny_mnist, tmp_path_factory):
    """`python lightning_mnist.py` with its defaults, on the tiny MNIST."""
    cwd = tmp_path_factory.mktemp("default_run")
    result = run_script("--data-dir", str(tiny_mnist), cwd=cwd)
    return cwd, result


def test_command_line_trains_tests_and_reports(default_run):
    cwd, result = default_run
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert reported_accuracy(result.stdout) >= 90.0  # the tiny digits are easy to tell apart
    version = cwd / "lightning_logs" / "version_0"
    assert list(version.glob("events.out.tfevents.*"))
    assert (version / "hparams.yaml").is_file()
    best = best_checkpoint(result.stdout)
    assert best.is_file() and best.parent == (version / "checkpoints").resolve()
    assert (version / "checkpoints" / "last.ckpt").is_file()
    # The best checkpoint is the epoch with the highest val_acc, named after it.
    events = read_events(version)
    val_acc = [event.value for event in events.Scalars("val_acc")]
    best_epoch = val_acc.index(max(val_acc))
    assert best.name == f"epoch={best_epoch}-val_acc={max(val_acc):.4f}.ckpt"
    assert torch.load(best, weights_only=False)["epoch"] == best_epoch


def test_output_of_a_default_run_is_clean(default_run):
    _, result = default_run
    output = result.stdout + result.stderr
    for unwanted in ("Warning", "warn(", "deprecated", "Tip:", "does not have many workers"):
        assert unwanted not in output, unwanted


def test_load_from_checkpoint_needs_no_other_argument_and_gives_the_logged_accuracy(default_run, tiny_mnist):
    _, result = default_run
    model = LitNeuralNet.load_from_checkpoint(best_checkpoint(result.stdout))
    assert model.hparams.data_dir == str(tiny_mnist) and model.hparams.hidden_size == 500
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(model, verbose=False)
    assert 100 * metrics["test_acc"] == pytest.approx(reported_accuracy(result.stdout), abs=0.006)


def test_no_tip_to_add_workers_on_a_machine_with_many_cores(tiny_mnist, tmp_path):
    # Lightning suggests workers when the machine has more than 2 cores: pretend it has 16.
    run = (
        "import runpy, sys, lightning_fabric.utilities.data as data\n"
        "data._num_cpus_available = lambda: 16\n"
        "print('suggested workers:', data.suggested_max_num_workers(1))\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--data-dir', {str(tiny_mnist)!r}, '--fast-dev-run']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", run], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "suggested workers: 15" in result.stdout
    assert "workers" not in result.stderr


## Real data


def test_default_run_on_real_mnist_reaches_97_percent(real_default_run):
    _, result = real_default_run
    assert result.returncode == 0, result.stderr
    accuracy = reported_accuracy(result.stdout)
    print(f"real MNIST, default run: {accuracy:.2f}% test accuracy")
    assert accuracy >= 97.0
    # What a user sees is clean: no Python warning (printed as "file.py:LINE: message").
    assert not re.search(r"\.py:\d+: ", result.stdout + result.stderr), result.stderr
