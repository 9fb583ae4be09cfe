"""The lesson: LitNeuralNet, its data, and what its steps log, checked against counts made here;
and the script as a user runs it, in its own process: its output, its checkpoint, real MNIST."""

import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import SCRIPT, TINY_TEST, best_checkpoint, reported_accuracy, run_script, trainers_with
from pytorch_lightning.utilities.model_summary import ModelSummary
from test_tensorboard import read_events
from torchvision.datasets import MNIST

from lightning_mnist import LitNeuralNet, main, parse_args
from mnist_kit.data import MNIST_MEAN, MNIST_STD
from mnist_kit.runs import model_arguments

## The model


def test_forward_takes_images_or_flat_vectors_and_returns_ten_logits():
    model = LitNeuralNet(hidden_size=32)
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert model(torch.zeros(4, 784)).shape == (4, 10)
    assert (model.l1.in_features, model.l1.out_features, model.l2.out_features) == (784, 32, 10)


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
    arguments = model_arguments(
        args, LitNeuralNet
    )  # the model flags left out are None until then: a checkpoint may set them
    assert (args.max_epochs, arguments["batch_size"], arguments["hidden_size"], arguments["learning_rate"]) == (
        2,
        100,
        500,
        1e-3,
    )


def test_model_summary_shows_the_shapes_and_the_flops_of_one_image():
    summary = ModelSummary(LitNeuralNet(), max_depth=1)
    layers = dict(zip(summary.layer_names, zip(summary.in_sizes, summary.out_sizes, strict=True), strict=True))
    assert layers["l1"] == ([1, 784], [1, 500]) and layers["l2"] == ([1, 500], [1, 10])
    assert summary.total_flops == 2 * (784 * 500 + 500 * 10)  # a multiply and an add per weight


## The data


def read_raw(data_dir, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An MNIST file pair as torchvision reads it, for comparison."""
    mnist = MNIST(str(data_dir), train=train)
    return mnist.data, mnist.targets


def test_setup_splits_the_training_images_into_a_fixed_training_and_validation_set(tiny_mnist):
    first, second = LitNeuralNet(data_dir=str(tiny_mnist)), LitNeuralNet(data_dir=str(tiny_mnist))
    first.setup("fit")
    second.setup("fit")
    assert (len(first.mnist_train), len(first.mnist_val), len(first.mnist_test)) == (550, 50, TINY_TEST)
    assert torch.equal(first.mnist_val.images, second.mnist_val.images)  # the split does not move
    # Training and validation images come from the training file, without overlap; test images from the test file.
    rows = {name: {bytes(image.numpy()) for image in read_raw(tiny_mnist, train)[0]} for name, train in
            (("train file", True), ("test file", False))}  # fmt: skip
    train_images = {bytes(image.numpy()) for image in first.mnist_train.images}
    val_images = {bytes(image.numpy()) for image in first.mnist_val.images}
    assert train_images | val_images == rows["train file"] and not train_images & val_images
    assert {bytes(image.numpy()) for image in first.mnist_test.images} == rows["test file"]


def test_a_batch_is_normalised_images_and_their_labels(tiny_mnist):
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
    first_labels = torch.cat([labels for _, labels in model.train_dataloader()])
    second_labels = torch.cat([labels for _, labels in model.train_dataloader()])
    assert not torch.equal(first_labels, second_labels)
    assert sorted(first_labels.tolist()) == sorted(model.mnist_train.labels.tolist())  # each image once an epoch
    assert torch.equal(torch.cat([labels for _, labels in model.val_dataloader()]), model.mnist_val.labels)
    assert torch.equal(torch.cat([labels for _, labels in model.test_dataloader()]), model.mnist_test.labels)


## What a run logs, against counts made here


class ValidationCounter(pl.Callback):
    """Counts, from the logits that validation_step returns, what each validation epoch should log."""

    def __init__(self) -> None:
        self.epochs, self.everything = [], []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.batches = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches.append((outputs.detach().float(), batch[1]))

    def on_validation_end(self, trainer, pl_module) -> None:
        self.everything += self.batches  # the sanity check's batches too
        if trainer.sanity_checking:
            return
        logits, labels = (torch.cat(parts) for parts in zip(*self.batches, strict=True))
        correct = logits.argmax(dim=1) == labels
        everything_logits, everything_labels = (torch.cat(parts) for parts in zip(*self.everything, strict=True))
        self.epochs.append(
            {
                "logged": {
                    name: trainer.callback_metrics[name].item() for name in ("val_acc", "val_loss", "avg_val_loss")
                },
                "images": len(labels),
                "accuracy": correct.float().mean().item(),  # of all images (micro)
                "mean of class accuracies": torch.stack([correct[labels == k].float().mean() for k in labels.unique()])
                .mean()
                .item(),
                "loss": F.cross_entropy(logits, labels).item(),  # per image
                "mean of batch losses": sum(F.cross_entropy(x, y).item() for x, y in self.batches) / len(self.batches),
                "loss of all batches so far": F.cross_entropy(everything_logits, everything_labels).item(),
            }
        )


def test_each_epoch_logs_the_accuracy_and_mean_loss_over_its_own_validation_images(tiny_mnist, tmp_path, monkeypatch):
    counter = ValidationCounter()
    trainers_with(monkeypatch, counter)
    monkeypatch.chdir(tmp_path)
    # Batches of 30 leave a short last batch of 20 of the 50 validation images; a low learning
    # rate keeps the accuracy far from 100% (12%, 30% and 56%) and unequal between the digits.
    flags = ["--data-dir", str(tiny_mnist), "--batch-size", "30", "--lr", "1e-5", "--max-epochs", "3"]
    assert main(flags) == 0
    assert len(counter.epochs) == 3
    for epoch in counter.epochs:
        assert epoch["images"] == 50
        assert epoch["logged"]["val_acc"] == pytest.approx(epoch["accuracy"], abs=1e-6)
        assert epoch["logged"]["val_loss"] == pytest.approx(epoch["loss"], rel=1e-5)
        assert epoch["logged"]["avg_val_loss"] == epoch["logged"]["val_loss"]
    # What makes the checks above tell right from wrong: the alternatives give other numbers.
    assert all(abs(epoch["accuracy"] - epoch["mean of class accuracies"]) > 1e-3 for epoch in counter.epochs)
    assert all(abs(epoch["loss"] - epoch["mean of batch losses"]) > 1e-4 for epoch in counter.epochs)
    assert all(abs(epoch["loss"] - epoch["loss of all batches so far"]) > 1e-3 for epoch in counter.epochs)


def evaluate(checkpoint, data_dir, train: bool = False) -> float:
    """The accuracy of a checkpoint's weights on all images of an MNIST file pair, computed here."""
    model = LitNeuralNet.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    images, labels = read_raw(data_dir, train)
    with torch.no_grad():
        logits = model(((images.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1))
    return (logits.argmax(dim=1) == labels).float().mean().item()


class SpoilTheLastEpoch(pl.Callback):
    """From the start of the last epoch the model guesses 0 for every image, and learns nothing more."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                pl_module.l2.weight.zero_()
                pl_module.l2.bias.copy_(torch.eye(10)[0])
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 0.0


def test_the_final_test_uses_the_weights_of_the_best_epoch_not_the_last(tiny_mnist, tmp_path, monkeypatch, capsys):
    trainers_with(monkeypatch, SpoilTheLastEpoch())
    monkeypatch.chdir(tmp_path)
    # At this learning rate epoch 1 validates better than epoch 0; epoch 2 is spoilt.
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--lr", "3e-5"]) == 0
    out = capsys.readouterr().out
    best = best_checkpoint(out)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(best, weights_only=False)["epoch"] == 1 and torch.load(last, weights_only=False)["epoch"] == 2
    assert evaluate(last, tiny_mnist) == pytest.approx(
        0.1
    )  # the last epoch's weights: 0 for every image, right for the 0s
    assert evaluate(best, tiny_mnist) > 0.3
    assert reported_accuracy(out) == pytest.approx(100 * evaluate(best, tiny_mnist), abs=0.006)


def test_fast_dev_run_trains_validates_and_tests_one_batch_and_writes_nothing(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    trainers = trainers_with(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", str(tiny_mnist), "--fast-dev-run"]) == 0
    (trainer,) = trainers
    assert trainer.global_step == 1 and trainer.num_val_batches == [1] and trainer.num_test_batches == [1]
    out = capsys.readouterr().out
    assert "Best checkpoint: (none: no epoch was validated and saved; tested the last weights)" in out
    assert reported_accuracy(out) == pytest.approx(100 * trainer.callback_metrics["test_acc"].item(), abs=0.006)
    assert list(tmp_path.iterdir()) == []  # no lightning_logs, no checkpoint


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
        f"import runpy, sys, lightning_fabric.utilities.data as data; sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "data._num_cpus_available = lambda: 16\n"
        "print('suggested workers:', data.suggested_max_num_workers(1))\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--data-dir', {str(tiny_mnist)!r}, '--fast-dev-run']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", run], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "suggested workers: 15" in result.stdout
    assert "workers" not in result.stderr


def test_default_run_on_real_mnist_reaches_97_percent(real_default_run):
    _, result = real_default_run
    assert result.returncode == 0, result.stderr
    accuracy = reported_accuracy(result.stdout)
    print(f"real MNIST, default run: {accuracy:.2f}% test accuracy")
    assert accuracy >= 97.0
    # What a user sees is clean: no Python warning (printed as "file.py:LINE: message").
    assert not re.search(r"\.py:\d+: ", result.stdout + result.stderr), result.stderr
