"""A run is one run wherever its folder goes: its state comes from what its checkpoints store,
never from a file or folder name; and every flag takes effect or is refused."""

import logging
import os
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import best_checkpoint, reported_accuracy, run_in, trainers_with
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pytorch_lightning.tuner import Tuner
from test_lesson import SpoilTheLastEpoch, evaluate

import lightning_mnist
from lightning_mnist import (
    LitNeuralNet,
    build_trainer,
    check_memory,
    claim_run_folder,
    finder_losses,
    main,
    newest_best_checkpoint,
    parse_args,
)


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


def test_left_out_model_flags_take_the_checkpoints_values_or_the_defaults(trained_run):
    last = str(trained_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    continued = lightning_mnist.model_arguments(parse_args(["--ckpt-path", last, "--batch-size", "50"]))
    assert (continued["hidden_size"], continued["batch_size"]) == (16, 50)
    fresh = lightning_mnist.model_arguments(parse_args([]))
    assert (fresh["hidden_size"], fresh["batch_size"], fresh["learning_rate"]) == (500, 100, 1e-3)


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
    with pytest.raises(lightning_mnist.RunError, match="has 795,010 weights"):
        check_memory({"hidden_size": 1000})
    pages["SC_PHYS_PAGES"] = 16 * weights
    check_memory({"hidden_size": 1000})


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
