"""The script end to end: model, data, every flag, bad input, and real accuracy."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_FILES, SCRIPT, TINY_TEST, run_script
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mnist import LitNeuralNet, main, parse_args

ACCURACY_LINE = re.compile(r"^Test accuracy: (\d+\.\d\d)%$", re.MULTILINE)
BEST_LINE = re.compile(r"^Best checkpoint: (.+\.ckpt)$", re.MULTILINE)


def reported_accuracy(output: str) -> float:
    """The percentage on the script's `Test accuracy` line; there must be exactly one."""
    found = ACCURACY_LINE.findall(output)
    assert len(found) == 1, output
    return float(found[0])


def best_checkpoint(output: str) -> Path:
    found = BEST_LINE.findall(output)
    assert len(found) == 1, output
    return Path(found[0])


## The model and the data


def test_forward_takes_images_or_flat_vectors_and_returns_ten_logits():
    model = LitNeuralNet(hidden_size=32)
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert model(torch.zeros(4, 784)).shape == (4, 10)
    assert model.l1.out_features == 32 and model.l2.in_features == 32


def test_hyperparameters_default_to_the_videos():
    model = LitNeuralNet()
    assert dict(model.hparams) == {
        "input_size": 784,
        "hidden_size": 500,
        "num_classes": 10,
        "learning_rate": 1e-3,
        "batch_size": 100,
        "data_dir": "./data",
        "num_workers": 0,
    }
    args = parse_args([])
    assert (args.max_epochs, args.batch_size, args.hidden_size, args.lr) == (2, 100, 500, 1e-3)


def test_setup_splits_training_images_into_disjoint_fixed_train_and_validation(tiny_mnist):
    first, second = LitNeuralNet(data_dir=str(tiny_mnist)), LitNeuralNet(data_dir=str(tiny_mnist))
    first.setup("fit")
    second.setup("fit")
    assert (len(first.mnist_train), len(first.mnist_val)) == (550, 50)  # 1/12 held out, as 5,000 of 60,000
    assert torch.equal(first.mnist_val.images, second.mnist_val.images)  # the split does not move
    train_rows = {bytes(image.numpy()) for image in first.mnist_train.images}
    assert not any(bytes(image.numpy()) in train_rows for image in first.mnist_val.images)
    first.setup("test")
    assert len(first.mnist_test) == TINY_TEST


def test_a_batch_is_normalised_images_and_labels_built_in_one_gather(tiny_mnist):
    model = LitNeuralNet(data_dir=str(tiny_mnist), batch_size=64)
    model.setup("fit")
    images, labels = next(iter(model.train_dataloader()))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64
    # 255 (the digit's square) and 0 map to (1 - mean) / std and -mean / std.
    assert images.max().item() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-5)
    assert images.min().item() >= -0.1307 / 0.3081 - 1e-5
    # The same pixels and labels as torchvision's own per-image path.
    dataset = model.mnist_train
    index = [3, 1, 4]
    batch_images, batch_labels = dataset.__getitems__(index)
    for row, i in enumerate(index):
        expected = (dataset.images[i].float() / 255 - 0.1307) / 0.3081
        assert torch.allclose(batch_images[row, 0], expected)
        assert batch_labels[row] == dataset.labels[i]
    image, label = dataset[3]  # one sample, as torchvision's datasets give it
    assert image.shape == (1, 28, 28) and torch.equal(image, batch_images[0]) and label == dataset.labels[3]


def test_training_shuffles_and_validation_and_test_do_not(tiny_mnist):
    model = LitNeuralNet(data_dir=str(tiny_mnist))
    model.setup("fit")
    model.setup("test")
    first_labels = torch.cat([labels for _, labels in model.train_dataloader()])
    second_labels = torch.cat([labels for _, labels in model.train_dataloader()])
    assert not torch.equal(first_labels, second_labels)
    assert torch.equal(torch.cat([labels for _, labels in model.val_dataloader()]), model.mnist_val.labels)
    assert torch.equal(torch.cat([labels for _, labels in model.test_dataloader()]), model.mnist_test.labels)


## Training, in process and as a user runs it


def test_fast_dev_run_in_process(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", str(tiny_mnist), "--fast-dev-run"]) == 0
    out = capsys.readouterr().out
    assert 0 <= reported_accuracy(out) <= 100
    assert not (tmp_path / "lightning_logs").exists()  # fast_dev_run logs and saves nothing


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
    checkpoint = torch.load(best, weights_only=False)
    assert checkpoint["epoch"] in (0, 1)
    assert (
        f"val_acc={checkpoint['callbacks'][next(iter(checkpoint['callbacks']))]['best_model_score']:.4f}" in best.name
    )


def test_output_of_a_default_run_is_clean(default_run):
    _, result = default_run
    output = result.stdout + result.stderr
    for unwanted in ("Warning", "warn(", "deprecated", "Tip:", "does not have many workers"):
        assert unwanted not in output, unwanted


def test_load_from_checkpoint_needs_no_other_argument_and_gives_the_logged_accuracy(default_run, tiny_mnist):
    _, result = default_run
    model = LitNeuralNet.load_from_checkpoint(best_checkpoint(result.stdout))
    assert model.hparams.data_dir == str(tiny_mnist) and model.hparams.hidden_size == 500
    import pytorch_lightning as pl

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


def test_help_lists_every_flag_with_its_default(tmp_path):
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in (
        "--fast-dev-run", "--max-epochs", "--gpus", "--accelerator", "--devices", "--strategy", "--num-nodes",
        "--precision", "--lr-find", "--deterministic", "--seed", "--gradient-clip-val", "--batch-size",
        "--hidden-size", "--lr", "--num-workers", "--data-dir", "--limit-train-batches", "--limit-val-batches",
        "--ckpt-path",
    ):  # fmt: skip
        assert flag in result.stdout, flag
    assert "(default: 2)" in result.stdout and "(default: ./data)" in result.stdout


## Every flag, exercised


def run_in_process(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_model_and_trainer_flags_reach_the_checkpoint(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = run_in_process(
        capsys,
        "--data-dir", str(tiny_mnist), "--hidden-size", "32", "--lr", "0.01", "--batch-size", "25",
        "--num-workers", "1", "--max-epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "0.5",
        "--seed", "7", "--deterministic", "--gradient-clip-val", "0.5", "--precision", "bf16-mixed",
        "--accelerator", "cpu", "--devices", "1", "--strategy", "auto", "--num-nodes", "1",
    )  # fmt: skip
    checkpoint = torch.load(best_checkpoint(out), weights_only=False)
    assert checkpoint["hyper_parameters"]["hidden_size"] == 32
    assert checkpoint["hyper_parameters"]["learning_rate"] == 0.01
    assert checkpoint["hyper_parameters"]["batch_size"] == 25
    assert checkpoint["hyper_parameters"]["num_workers"] == 1
    assert checkpoint["global_step"] == 3  # --limit-train-batches 3, one epoch
    assert checkpoint["state_dict"]["l1.weight"].shape == (32, 784)


def test_precision_16_is_the_videos_name_for_16_mixed(tiny_mnist, tmp_path, monkeypatch, capsys):
    assert parse_args(["--precision", "16"]).precision == "16-mixed"
    monkeypatch.chdir(tmp_path)
    out = run_in_process(capsys, "--data-dir", str(tiny_mnist), "--fast-dev-run", "2", "--precision", "16")
    assert 0 <= reported_accuracy(out) <= 100


def test_lr_find_prints_and_applies_its_suggestion(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = run_in_process(
        capsys, "--data-dir", str(tiny_mnist), "--lr-find", "--max-epochs", "20"
    )  # the finder's 100 steps stop at the end of the last epoch, so 20 epochs of 6 batches
    suggested = float(
        re.search(r"^Learning-rate finder suggests (\S+); training with it\.$", out, re.MULTILINE).group(1)
    )
    checkpoint = torch.load(best_checkpoint(out), weights_only=False)
    assert checkpoint["hyper_parameters"]["learning_rate"] == pytest.approx(suggested, rel=1e-2)
    assert checkpoint["hyper_parameters"]["learning_rate"] != 1e-3
    # The finder's plot, its suggestion a red dot, in the run's folder and in TensorBoard.
    run_folder = tmp_path / "lightning_logs" / "version_0"
    plot = np.asarray(Image.open(run_folder / "lr_find.png").convert("RGB")).astype(int)
    red = (plot[..., 0] > 200) & (plot[..., 1] < 50) & (plot[..., 2] < 50)
    assert red.sum() > 20
    events = EventAccumulator(str(run_folder))
    events.Reload()
    assert [image.step for image in events.Images("lr_find")] == [0]


def test_ckpt_path_resumes_training_where_it_stopped(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_in_process(capsys, "--data-dir", str(tiny_mnist), "--max-epochs", "1")
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(first, weights_only=False)["global_step"]
    assert steps_per_epoch == 6  # 550 images, batches of 100
    out = run_in_process(capsys, "--data-dir", str(tiny_mnist), "--max-epochs", "3", "--ckpt-path", str(first))
    resumed = torch.load(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 3 * steps_per_epoch and resumed["epoch"] == 2
    assert first.is_file()  # the first run's checkpoint is untouched
    assert 0 <= reported_accuracy(out) <= 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpus_1_trains_on_the_gpu(tiny_mnist, tmp_path):
    result = run_script("--data-dir", str(tiny_mnist), "--gpus", "1", "--max-epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GPU available: True (cuda), used: True" in result.stdout + result.stderr
    assert reported_accuracy(result.stdout) >= 50.0


## Bad input: a message on stderr, a non-zero exit, no traceback, nothing lost


def assert_clean_failure(result, *phrases: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert "error:" in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)


@pytest.mark.parametrize(
    ("flag", "value", "phrase"),
    [
        ("--max-epochs", "-1", "must be a positive integer"),
        ("--batch-size", "0", "must be a positive integer"),
        ("--lr", "0", "must be a positive number"),
        ("--precision", "64", "must be one of 32-true, 16-mixed, bf16-mixed"),
        ("--limit-train-batches", "1.5", "a fraction in (0, 1]"),
        ("--devices", "two", "must be"),
    ],
)
def test_impossible_flag_values_are_refused(flag, value, phrase, tmp_path):
    result = run_script(flag, value, cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_failure(result, flag, phrase)


def test_missing_mnist_without_network_names_the_four_files(tmp_path):
    existing = tmp_path / "lightning_logs" / "version_0" / "keep.txt"
    existing.parent.mkdir(parents=True)
    existing.write_text("an earlier run")
    # A proxy on a closed local port makes every download fail at once, network or not.
    closed = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    result = run_script("--data-dir", str(tmp_path / "nowhere"), "--fast-dev-run", cwd=tmp_path, env=closed)
    assert_clean_failure(result, "could not be downloaded", "--data-dir", str(Path("nowhere", "MNIST", "raw")))
    for name in MNIST_FILES:
        assert name in result.stderr
    assert existing.read_text() == "an earlier run"


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_mnist_files_are_reported(damage, tiny_mnist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_mnist, data)
    images = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    content = images.read_bytes()
    images.write_bytes(content[: len(content) // 2] if damage == "truncate" else b"\x07" * 16 + content[16:])
    result = run_script("--data-dir", str(data), "--fast-dev-run", cwd=tmp_path)
    assert_clean_failure(result, "could not be read", "--data-dir")


def test_gpu_asked_for_on_a_machine_without_one(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_script("--gpus", "1", cwd=tmp_path)
    assert_clean_failure(result, "no GPU", "leave out --gpus")


def test_a_missing_checkpoint_to_resume_from_is_refused(tmp_path):
    result = run_script("--ckpt-path", str(tmp_path / "missing.ckpt"), cwd=tmp_path)
    assert_clean_failure(result, "--ckpt-path", "no checkpoint file")


def test_gpus_with_accelerator_is_refused(tmp_path):
    result = run_script("--gpus", "1", "--accelerator", "cpu", cwd=tmp_path)
    assert_clean_failure(result, "give one or the other")


## Real data


def test_default_run_on_real_mnist_reaches_97_percent(real_mnist, tmp_path):
    result = run_script("--data-dir", str(real_mnist), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    accuracy = reported_accuracy(result.stdout)
    print(f"real MNIST, default run: {accuracy:.2f}% test accuracy")
    assert accuracy >= 97.0
    # What a user sees is clean: no Python warning (printed as "file.py:LINE: message").
    assert not re.search(r"\.py:\d+: ", result.stdout + result.stderr), result.stderr
