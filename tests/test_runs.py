"""A run is one run wherever its folder goes: its state comes from what its checkpoints store,
never from a file or folder name; it resumes where it stopped and keeps its best; reruns with
one seed are bit-identical; runs started together never share a folder; and every flag takes
effect or is refused."""

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    SCRIPT,
    best_checkpoint,
    reported_accuracy,
    run_in,
    trainers_with,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pytorch_lightning.tuner import Tuner
from pytorch_lightning.utilities import rank_zero_only
from test_lesson import SpoilTheLastEpoch, evaluate
from test_tensorboard import read_events

import mnist_kit.data
import mnist_kit.errors
import mnist_kit.runs
from lightning_mnist import LitNeuralNet, build_trainer, main, newest_best_checkpoint, parse_args
from mnist_kit.lr_finder import finder_losses, suggested_rate
from mnist_kit.runs import check_memory, claim_run_folder


def fake_checkpoint(path: Path, score: float | None, step: int) -> Path:
    """A file that stores what a checkpoint of this script stores about its validation, and no weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"monitor": "val_acc", "current_score": None if score is None else torch.tensor(score)}
    last = {"monitor": None, "current_score": None}
    torch.save(
        {"global_step": step, "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": state, "ModelCheckpoint{}": last}},
        path,
    )
    return path


## Run folders: claimed by mkdir, used under the names they have


def test_a_folder_another_run_claims_between_the_search_and_the_mkdir_is_left_to_it(tmp_path, monkeypatch):
    (tmp_path / "lightning_logs" / "version_3").mkdir(parents=True)
    mkdir = Path.mkdir

    def another_run_first(self, *args, **kwargs):  # another run's mkdir of the same folder wins the race
        if self.name == "version_4" and not self.exists():
            mkdir(self)
            (self / "theirs").touch()
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", another_run_first)
    assert claim_run_folder(tmp_path) == 5
    assert list((tmp_path / "lightning_logs" / "version_4").iterdir()) == [tmp_path / "lightning_logs/version_4/theirs"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.lists(
        st.text(min_size=1, max_size=8).filter(lambda text: "/" not in text and "\0" not in text), max_size=4
    )
)
def test_odd_folder_names_neither_crash_a_new_run_nor_are_taken_by_it(names, tmp_path_factory):
    logs = tmp_path_factory.mktemp("odd") / "lightning_logs"
    odd = {"version_00", "version_²", "version_1 (copy)", "version_٣", *(f"version_{name}" for name in names)}
    odd = {name for name in odd if name not in (".", "..") and len(name.encode()) < 255}
    for name in odd:
        (logs / name).mkdir(parents=True, exist_ok=True)
    claimed = f"version_{claim_run_folder(logs.parent)}"
    assert claimed not in odd and (logs / claimed).is_dir()
    assert {path.name for path in logs.iterdir()} == odd | {claimed}


@pytest.fixture(scope="module")
def trained_run(tiny_mnist, tmp_path_factory) -> Path:
    """A folder in which a run of 2 epochs was trained on the tiny MNIST (epoch 1 spoilt: epoch 0 is the best)."""
    argv = ["--data-dir", str(tiny_mnist), "--max-epochs", "2", "--hidden-size", "16", "--batch-size", "50"]
    return run_in(tmp_path_factory.mktemp("trained"), argv, SpoilTheLastEpoch())


def test_a_copy_named_version_00_is_continued_in_itself_not_in_version_0(
    trained_run, tiny_mnist, tmp_path, monkeypatch
):
    shutil.copytree(trained_run / "lightning_logs", tmp_path / "lightning_logs")
    original = tmp_path / "lightning_logs" / "version_0"
    copy = original.with_name("version_00")
    shutil.copytree(original, copy)
    before = {path: path.read_bytes() for path in original.rglob("*") if path.is_file()}
    monkeypatch.chdir(tmp_path)
    argv = ["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--ckpt-path", str(copy / "checkpoints" / "last.ckpt")]
    assert main(argv) == 0
    assert {path: path.read_bytes() for path in original.rglob("*") if path.is_file()} == before
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_the_progress_bar_names_a_continued_run_by_its_folder(trained_run, tiny_mnist, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained_run / "lightning_logs", tmp_path / "lightning_logs")
    copy = tmp_path / "lightning_logs" / "version_0 (copy)"
    (tmp_path / "lightning_logs" / "version_0").rename(copy)
    monkeypatch.chdir(tmp_path)
    argv = ["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--ckpt-path", str(copy / "checkpoints" / "last.ckpt")]
    assert main(argv) == 0
    bars = capsys.readouterr().out  # Lightning draws its progress bar on stdout
    assert "v_num=version_0 (copy)," in bars and "v_num=opy)" not in bars


## A moved run keeps its best


@pytest.mark.parametrize("saved_by", ["ModelCheckpoint", "RunCheckpoint"])
def test_a_run_continued_after_its_folder_moved_keeps_its_best_and_tests_it(
    saved_by, trained_run, tiny_mnist, tmp_path, monkeypatch, capsys
):
    # The whole project folder is renamed, as a copy to another machine or a new mount point does.
    moved = tmp_path / "moved project"
    shutil.copytree(trained_run, moved)
    checkpoints = moved / "lightning_logs" / "version_0" / "checkpoints"
    # Saved under ModelCheckpoint's key, or RunCheckpoint's, as this script did for a while.
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    last["callbacks"] = {key.replace("ModelCheckpoint", saved_by): state for key, state in last["callbacks"].items()}
    torch.save(last, checkpoints / "last.ckpt")
    (best_before,) = [path for path in checkpoints.glob("*.ckpt") if path.name != "last.ckpt"]
    best_before = best_before.rename(checkpoints / "renamed by hand (copy).ckpt")  # content, not names
    monkeypatch.chdir(moved)
    trainers_with(monkeypatch, SpoilTheLastEpoch())  # epoch 2 is spoilt too: worse than epoch 0
    capsys.readouterr()
    assert (
        main(["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--ckpt-path", str(checkpoints / "last.ckpt")]) == 0
    )
    out = capsys.readouterr().out
    assert best_checkpoint(out) == best_before
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "renamed by hand (copy).ckpt"]
    assert torch.load(best_before, weights_only=True)["epoch"] == 0
    assert reported_accuracy(out) == pytest.approx(100 * evaluate(best_before, tiny_mnist), abs=0.006)


def test_the_run_state_is_kept_under_model_checkpoints_own_key(trained_run):
    # A checkpoint saved by a plain ModelCheckpoint (this script before RunCheckpoint) restores
    # its best into RunCheckpoint, and a RunCheckpoint's into a plain ModelCheckpoint, only so.
    from pytorch_lightning.callbacks import ModelCheckpoint

    saved = torch.load(trained_run / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    plain = ModelCheckpoint(monitor="val_acc", mode="max", filename="{epoch}-{val_acc:.4f}")
    assert saved["callbacks"][plain.state_key]["best_model_score"] is not None
    trainer = build_trainer(parse_args(["--fast-dev-run"]))  # no run folder
    assert {callback.state_key for callback in trainer.checkpoint_callbacks} == set(saved["callbacks"]) & {
        plain.state_key,
        ModelCheckpoint(filename="last", enable_version_counter=False, save_on_exception=True).state_key,
    }


## --predict finds the best by what the checkpoints store


@settings(max_examples=30, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=5),
    names=st.lists(
        st.sampled_from(["epoch=0-val_acc=0.8600-v1", "x (copy)", "last", "epoch=9-val_acc=1.0000", "²", "a"]),
        min_size=5,
        max_size=5,
        unique=True,
    ),
)
def test_the_best_checkpoint_is_the_best_stored_score_whatever_the_names(scores, names, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    for step, (score, name) in enumerate(zip(scores, names, strict=False)):
        fake_checkpoint(logs / "version_²" / "checkpoints" / f"{name}.ckpt", score, step)
    best = max(range(len(scores)), key=lambda index: (scores[index], -index))
    assert newest_best_checkpoint(logs) == logs / "version_²" / "checkpoints" / f"{names[best]}.ckpt"


def test_the_newest_run_is_the_one_that_saved_last_and_runs_without_a_score_are_passed_over(tmp_path):
    logs = tmp_path / "lightning_logs"
    older = fake_checkpoint(logs / "version_10" / "checkpoints" / "epoch=1-val_acc=0.9900.ckpt", 0.99, 10)
    newer = fake_checkpoint(logs / "version_9 (copy)" / "checkpoints" / "a.ckpt", 0.5, 3)
    fake_checkpoint(logs / "version_x" / "checkpoints" / "last.ckpt", None, 4)  # validated nothing
    (logs / "version_y" / "checkpoints").mkdir(parents=True)
    (logs / "version_y" / "checkpoints" / "damaged.ckpt").write_bytes(b"PK\x03\x04 cut")
    for age, path in enumerate(
        [older, newer, logs / "version_x/checkpoints/last.ckpt", logs / "version_y/checkpoints/damaged.ckpt"]
    ):
        os.utime(path, (1000 + age, 1000 + age))
    assert newest_best_checkpoint(logs) == newer
    assert newest_best_checkpoint(tmp_path / "nowhere") is None


def test_of_equal_scores_the_checkpoint_saved_first_is_the_best(tmp_path):
    # A last.ckpt saved by Ctrl-C after the best epoch stores its score, with weights trained further.
    checkpoints = tmp_path / "version_0" / "checkpoints"
    fake_checkpoint(checkpoints / "last.ckpt", 0.9, 50)
    first = fake_checkpoint(checkpoints / "zz.ckpt", 0.9, 40)
    assert newest_best_checkpoint(tmp_path) == first


def test_predict_reads_a_run_with_lightning_and_file_manager_names(trained_run, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "lightning_logs" / "version_²"
    shutil.copytree(trained_run / "lightning_logs" / "version_0", folder)
    checkpoints = folder / "checkpoints"
    (best,) = [path for path in checkpoints.glob("*.ckpt") if path.name != "last.ckpt"]
    shutil.copy(best, checkpoints / "epoch=0-val_acc=0.8600-v1.ckpt")
    best.rename(checkpoints / f"{best.stem} (copy).ckpt")
    monkeypatch.chdir(tmp_path)
    picture = Image.new("L", (28, 28))  # a stroke: any digit will do
    picture.paste(255, (12, 4, 16, 24))
    picture.save("one.png")
    assert main(["--predict", "one.png"]) == 0
    err = capsys.readouterr().err
    assert "Checkpoint: lightning_logs/version_²/checkpoints/epoch=0-val_acc=0.8600-v1.ckpt" in err or (
        f"Checkpoint: lightning_logs/version_²/checkpoints/{best.stem} (copy).ckpt" in err
    )


## Flags: each takes effect, or is refused


def refused(capsys, *argv: str) -> str:
    """The one error line of a command line that argparse refuses."""
    with pytest.raises(SystemExit) as exit:
        parse_args(list(argv))
    assert exit.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("usage: ") and "Traceback" not in "".join(lines)
    return lines[-1]


@pytest.mark.parametrize(
    "flags",
    [
        ["--hidden-size", "64"],
        ["--lr-find"],
        ["--max-epochs", "2"],
        ["--strategy", "ddp"],
        ["--seed", "1"],
        ["--data-dir", "x", "--num-workers", "1"],
        ["--fast-dev-run"],
        ["--gradient-clip-val", "1"],
    ],
)
def test_predict_refuses_the_flags_of_training_by_name(flags, capsys):
    line = refused(capsys, "--predict", "seven.png", *flags)
    named = [flag for flag in flags if flag.startswith("--")]
    assert line.endswith(f"--predict trains nothing, so {', '.join(named)} would not apply: leave them out")


def test_predict_takes_the_flags_that_apply_to_it():
    args = parse_args(["--predict", "a.png", "--batch-size", "7", "--precision", "bf16-mixed", "--accelerator", "cpu"])
    assert (args.batch_size, args.precision, args.accelerator) == (7, "bf16-mixed", "cpu")


def test_lr_find_and_fast_dev_run_are_refused_with_a_checkpoint(trained_run, capsys):
    last = str(trained_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert "--lr-find chooses the learning rate of a new run" in refused(capsys, "--lr-find", "--ckpt-path", last)
    assert "--fast-dev-run checks the code on new weights" in refused(
        capsys, "--ckpt-path", last, "--fast-dev-run", "2"
    )


@pytest.mark.parametrize("lr", ["0.001", "0.01"])  # the default given explicitly, too
def test_lr_is_refused_beside_lr_find_which_would_replace_it(lr, capsys):
    line = refused(capsys, "--lr", lr, "--lr-find")
    assert line.endswith("--lr-find chooses the learning rate itself: give --lr or --lr-find, not both")


@pytest.mark.parametrize(("flags", "named"), [(["--hidden-size", "500"], "--hidden-size 500"),
                                              (["--batch-size", "100"], "--batch-size 100"),
                                              (["--lr", "0.001"], "--lr 0.001")])  # fmt: skip
def test_a_default_given_explicitly_against_a_checkpoint_is_refused(
    flags, named, trained_run, tiny_mnist, in_tmp_path, capsys
):
    last = trained_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    hparams = torch.load(last, weights_only=True)["hyper_parameters"]
    torch.save(
        {**torch.load(last, weights_only=True), "hyper_parameters": {**hparams, "learning_rate": 0.002}}, "mine.ckpt"
    )
    assert main(["--data-dir", str(tiny_mnist), "--ckpt-path", "mine.ckpt", *flags]) == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: {named} contradicts the checkpoint")


def test_left_out_model_flags_take_the_checkpoints_values_or_the_defaults(trained_run, capsys):
    last = str(trained_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    continued = mnist_kit.runs.model_arguments(parse_args(["--ckpt-path", last, "--batch-size", "50"]), LitNeuralNet)
    assert (continued["hidden_size"], continued["batch_size"]) == (16, 50)
    # One line says what the continued run took from its checkpoint: the flags left out, with their values.
    assert (
        capsys.readouterr().err
        == f"Continuing {last} with its own --hidden-size 16, --lr {continued['learning_rate']:g}.\n"
    )
    fresh = mnist_kit.runs.model_arguments(parse_args([]), LitNeuralNet)
    assert (fresh["hidden_size"], fresh["batch_size"], fresh["learning_rate"]) == (500, 100, 1e-3)
    mnist_kit.runs.model_arguments(parse_args(["--ckpt-path", last, "--hidden-size", "16", "--lr",
                                               str(continued["learning_rate"]), "--batch-size", "50"]), LitNeuralNet)  # fmt: skip
    assert capsys.readouterr().err == ""  # fresh, or every value given: nothing was taken


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf"])
def test_gradient_clip_val_is_a_number_of_at_least_0(value, capsys):
    assert "argument --gradient-clip-val: expected a number of at least 0" in refused(
        capsys, f"--gradient-clip-val={value}"
    )


@pytest.mark.parametrize(
    "flags",
    [[flag, "99999999999999999999"] for flag in ("--batch-size", "--hidden-size", "--num-workers", "--fast-dev-run",
     "--max-epochs", "--gpus", "--num-nodes", "--seed", "--devices")] + [["--num-workers", str(os.cpu_count() + 1)]],
)  # fmt: skip
def test_counts_too_large_for_torch_or_the_machine_are_refused(flags, capsys):
    assert f"argument {flags[0]}: expected" in refused(capsys, *flags)


@pytest.mark.parametrize(
    "flags", [["--max-epochs", "0"], ["--limit-train-batches", "0"], ["--limit-train-batches", "0.0"]]
)
def test_a_run_that_would_train_nothing_is_refused(flags, capsys):
    assert refused(capsys, *flags).endswith(
        f"{' '.join(flags)} trains nothing: give at least 1 (--max-epochs -1 trains with no end)"
    )


def test_the_precision_recorded_is_the_one_lightning_runs(in_tmp_path, capsys):
    args = parse_args(["--precision", "16-mixed", "--accelerator", "cpu"])
    trainer = build_trainer(args)
    assert args.precision == trainer.precision == "bf16-mixed"  # what HParams records, from vars(args)
    assert (
        "Training in precision bf16-mixed, which Lightning chose for --precision 16-mixed." in capsys.readouterr().err
    )


def test_predict_puts_back_the_lightning_log_level(trained_run, monkeypatch, capsys):
    monkeypatch.chdir(trained_run)
    logger = logging.getLogger("pytorch_lightning")
    monkeypatch.setattr(logger, "level", logging.INFO)
    assert main(["--predict", "missing.png"]) == 1
    assert logger.level == logging.INFO


## Memory and the learning-rate finder


def test_the_memory_check_counts_gradients_and_adams_state(monkeypatch):
    weights = 784 * 1000 + 1000 + 1000 * 10 + 10
    pages = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 8 * weights}  # room for the weights twice over, not four times
    monkeypatch.setattr(os, "sysconf", pages.__getitem__)
    with pytest.raises(mnist_kit.errors.RunError, match="has 795,010 weights"):
        check_memory({"hidden_size": 1000}, LitNeuralNet)
    pages["SC_PHYS_PAGES"] = 16 * weights
    check_memory({"hidden_size": 1000}, LitNeuralNet)


class RecordingNet(LitNeuralNet):
    """LitNeuralNet that keeps each training step's loss, to compare with what the finder reports."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def test_the_finder_losses_are_each_steps_own_loss(tiny_mnist, tmp_path):
    pl.seed_everything(0)
    model = RecordingNet(hidden_size=16, batch_size=10, data_dir=str(tiny_mnist))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    finder = Tuner(trainer).lr_find(model, num_training=30, update_attr=False, early_stop_threshold=None)
    reported = finder.results["loss"]
    assert reported[0] == pytest.approx(model.losses[0] / 2, rel=0.05)  # Lightning's curve starts at half the loss
    assert finder_losses(reported) == pytest.approx(model.losses[: len(reported)], rel=1e-4)


@settings(max_examples=50, deadline=None)
@given(lowest=st.integers(20, 80), noise=st.floats(0, 0.05), seed=st.integers(0, 2**16))
def test_the_finder_suggests_a_tenth_of_the_rate_where_the_smoothed_loss_is_lowest(lowest, noise, seed):
    # A range test's 100 rates from 1e-8 to 1, and a loss whose valley lies at rate number `lowest`,
    # with noise that the smoothing must not mistake for the valley.
    rates = torch.logspace(-8, 0, 100).tolist()
    generator = torch.Generator().manual_seed(seed)
    losses = (((torch.arange(100) - lowest) / 20) ** 2 + 0.5 + noise * torch.randn(100, generator=generator)).tolist()
    losses[-3:] = [float("nan"), float("inf"), 1e6]  # where the loss blew up
    smoothed, rate = suggested_rate(rates, losses)
    assert len(smoothed) == 100
    # The smoothing lags a few steps behind the valley, at most 10 (a factor of 1.6 in the rate).
    found = min(range(97), key=smoothed.__getitem__)
    assert rate == rates[found] / 10
    assert lowest <= found <= lowest + 10


def jittered(original):
    """MNISTTensors.__getitems__ with an augmentation drawn with numpy, as users add to the template:
    a random shade of each image's top-left pixel, where a callback can read the draw back."""

    def __getitems__(self, indices):
        images, labels = original(self, indices)
        images[:, 0, 0, 0] = torch.from_numpy(np.random.random(len(labels))).float()
        return images, labels

    return __getitems__


class RecordDraws(pl.Callback):
    """The augmentation's draws in each training batch, in the order trained on."""

    def __init__(self) -> None:
        self.draws = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.draws.append(batch[0][:, 0, 0, 0].clone())


def test_reruns_with_workers_and_one_seed_train_alike_and_another_seed_differs(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mnist_kit.data.MNISTTensors, "__getitems__", jittered(mnist_kit.data.MNISTTensors.__getitems__))
    runs = []
    for seed in (7, 7, 8):
        recorder = RecordDraws()
        trainers = trainers_with(monkeypatch, recorder)
        argv = ["--data-dir", str(tiny_mnist), "--num-workers", "2", "--max-epochs", "1", "--seed", str(seed)]
        assert main([*argv, "--limit-train-batches", "4", "--limit-val-batches", "0"]) == 0
        runs.append((torch.cat(recorder.draws), trainers[-1].lightning_module.state_dict()))
    (draws, weights), (rerun_draws, rerun_weights), (other_draws, other_weights) = runs
    assert len(draws) == 400 and len(set(draws.tolist())) == 400  # each worker draws numbers of its own
    assert torch.equal(draws, rerun_draws)
    assert all(torch.equal(weights[name], rerun_weights[name]) for name in weights)  # bit-identical
    assert not torch.equal(draws, other_draws)
    assert not torch.equal(weights["l1.weight"], other_weights["l1.weight"])


def test_ckpt_path_resumes_training_where_it_stopped_in_the_same_run(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "1"]) == 0
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    steps_per_epoch = torch.load(last, weights_only=False)["global_step"]
    assert steps_per_epoch == 6  # 550 images, batches of 100
    capsys.readouterr()
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--ckpt-path", str(last)]) == 0
    out = capsys.readouterr().out
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 3 * steps_per_epoch and resumed["epoch"] == 2
    assert reported_accuracy(out) == pytest.approx(100 * evaluate(best_checkpoint(out), tiny_mnist), abs=0.006)
    # The same run: one folder, whose curves go on from where they stopped.
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    events = read_events(tmp_path / "lightning_logs" / "version_0")
    assert [event.step for event in events.Scalars("val_acc")] == [5, 11, 17]  # the last step of each epoch


class SpoilFromEpoch(pl.Callback):
    """From the start of epoch 2 the model guesses 0 for every image and learns nothing more; Ctrl-C
    stops the run (when asked to) in the middle of that epoch."""

    def __init__(self, interrupt: bool) -> None:
        self.interrupt = interrupt

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 2:
            with torch.no_grad():
                pl_module.l2.weight.zero_()
                pl_module.l2.bias.copy_(torch.eye(10)[0])
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.interrupt and trainer.current_epoch == 2 and batch_idx == 3:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_run_interrupted_after_its_best_epoch_is_tested_with_that_epochs_checkpoint(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    flags = ["--data-dir", str(tiny_mnist), "--max-epochs", "3", "--lr", "3e-5"]  # epoch 1 validates best
    trainers_with(monkeypatch, SpoilFromEpoch(interrupt=True))
    assert main(flags) == 130
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    (best,) = checkpoints.glob("epoch=1-*.ckpt")
    last = checkpoints / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 16  # stopped in epoch 2
    capsys.readouterr()

    trainers_with(monkeypatch, SpoilFromEpoch(interrupt=False))
    assert main([*flags, "--ckpt-path", str(last)]) == 0
    out = capsys.readouterr().out
    assert best_checkpoint(out) == best  # the best of the whole run, from before the interruption
    assert reported_accuracy(out) == pytest.approx(100 * evaluate(best, tiny_mnist), abs=0.006)
    assert evaluate(last, tiny_mnist) == pytest.approx(0.1)  # what testing the last epoch would have given
    assert sorted(path.name for path in checkpoints.iterdir()) == [best.name, "last.ckpt"]


def run_at_once(*runs: tuple[Path, list[str]], timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """Start lightning_mnist.py once for each (folder, arguments), all at the same time, and wait for all."""
    processes = []
    try:
        for cwd, args in runs:
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), *args],
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
        return results
    finally:
        for process in processes:
            process.kill()  # whatever happened, none outlives the test


def test_same_seed_gives_bit_identical_weights_and_accuracy_and_another_seed_does_not(tiny_mnist, tmp_path):
    flags = ("--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "3", "--deterministic")
    seeds = {"first": "7", "again": "7", "other": "8"}
    for name in seeds:
        (tmp_path / name).mkdir()
    results = run_at_once(*((tmp_path / name, [*flags, "--seed", seed]) for name, seed in seeds.items()))
    assert [result.returncode for result in results] == [0, 0, 0], [result.stderr for result in results]
    outputs = {name: result.stdout for name, result in zip(seeds, results, strict=True)}

    weights = {
        name: torch.load(
            tmp_path / name / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False
        )["state_dict"]
        for name in seeds
    }
    for key in ("l1.weight", "l1.bias", "l2.weight", "l2.bias"):
        assert torch.equal(weights["first"][key], weights["again"][key]), key
        assert not torch.equal(weights["first"][key], weights["other"][key]), key
    assert reported_accuracy(outputs["first"]) == reported_accuracy(outputs["again"])


def test_run_folders_are_claimed_one_each_even_when_picked_at_once(tmp_path):
    # Lightning's logger takes the highest version_N plus one, so two runs that look
    # before either has written anything take the same folder. This one claims it as it picks it.
    assert [pl.loggers.TensorBoardLogger(save_dir=tmp_path / "plain").version for _ in range(2)] == [0, 0]
    (tmp_path / "lightning_logs" / "version_3").mkdir(parents=True)
    assert [claim_run_folder(tmp_path) for _ in range(2)] == [4, 5]
    assert sorted(path.name for path in (tmp_path / "lightning_logs").iterdir()) == [f"version_{n}" for n in (3, 4, 5)]


def test_processes_other_than_global_rank_0_claim_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert claim_run_folder(tmp_path) is None
    assert not (tmp_path / "lightning_logs").exists()


def test_runs_started_together_in_one_folder_keep_their_own_logs_and_checkpoints(tiny_mnist, tmp_path):
    earlier = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier run")
    flags = ("--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "2")
    results = run_at_once(*((tmp_path, [*flags, "--hidden-size", size]) for size in ("8", "16")))
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    folders = set()
    for hidden_size, result in zip((8, 16), results, strict=True):
        folder = best_checkpoint(result.stdout).parent.parent
        folders.add(folder)
        for checkpoint in folder.glob("checkpoints/*.ckpt"):
            assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["hidden_size"] == hidden_size
        assert f"hidden_size: {hidden_size}\n" in (folder / "hparams.yaml").read_text()
    assert folders == {tmp_path / "lightning_logs" / f"version_{n}" for n in (1, 2)}
    assert earlier.read_text() == "an earlier run"
