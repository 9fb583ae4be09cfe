"""The command line: every flag reaches the Trainer or the model, Lightning's own values are
accepted, and every refusal is one line that names the flag."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    MNIST_FILES,
    best_checkpoint,
    reported_accuracy,
    run_script,
    trainers_with,
)
from PIL import Image
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mnist import build_trainer, main, parse_args

## Flags reach the Trainer that main() builds


def test_trainer_flags_reach_the_trainer(in_tmp_path):
    flags = ["--max-epochs", "5", "--precision", "bf16-mixed", "--gradient-clip-val", "0.5", "--deterministic",
             "--limit-train-batches", "7", "--limit-val-batches", "0.25", "--accelerator", "cpu", "--devices", "2",
             "--strategy", "ddp", "--num-nodes", "1", "--fast-dev-run", "0"]  # fmt: skip
    trainer = build_trainer(parse_args(flags))
    assert trainer.max_epochs == 5
    assert trainer.precision == "bf16-mixed"
    assert trainer.gradient_clip_val == 0.5
    assert torch.are_deterministic_algorithms_enabled()
    assert (trainer.limit_train_batches, trainer.limit_val_batches) == (7, 0.25)
    assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices == 2
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_nodes == 1
    assert not trainer.fast_dev_run
    assert trainer.log_every_n_steps == 10


def test_the_defaults_make_the_videos_trainer(in_tmp_path):
    trainer = build_trainer(parse_args([]))
    assert (trainer.max_epochs, trainer.precision, trainer.gradient_clip_val) == (2, "32-true", None)
    assert not torch.are_deterministic_algorithms_enabled()
    assert (trainer.limit_train_batches, trainer.limit_val_batches) == (1.0, 1.0)
    assert isinstance(trainer.strategy, SingleDeviceStrategy) and trainer.num_devices == 1
    assert trainer.logger.log_dir == str(in_tmp_path / "lightning_logs" / "version_0")


def test_gpus_n_is_the_videos_name_for_n_gpus(in_tmp_path, four_gpus):
    trainer = build_trainer(parse_args(["--gpus", "3"]))
    assert isinstance(trainer.accelerator, CUDAAccelerator) and trainer.device_ids == [0, 1, 2]


@pytest.mark.parametrize(
    ("flags", "attribute", "value"),
    [
        (["--limit-val-batches", "0"], "limit_val_batches", 0),
        (["--limit-train-batches", "1"], "limit_train_batches", 1),  # one batch, not all of them
        (["--limit-train-batches", "1.0"], "limit_train_batches", 1.0),
        (["--max-epochs", "-1"], "max_epochs", -1),  # train until stopped
        (["--precision", "bf16-true"], "precision", "bf16-true"),
        (["--precision", "64-true"], "precision", "64-true"),
        (["--precision", "64"], "precision", "64-true"),
        (["--accelerator", "gpu", "--devices", "-1"], "device_ids", [0, 1, 2, 3]),  # all of them
        (["--accelerator", "cuda", "--devices", "1,3"], "device_ids", [1, 3]),
        (["--gradient-clip-val", "0"], "gradient_clip_val", 0),
    ],
)
def test_values_that_lightning_accepts_are_accepted(flags, attribute, value, in_tmp_path, four_gpus):
    assert getattr(build_trainer(parse_args(flags)), attribute) == value


def test_the_videos_precision_16_is_16_mixed_or_on_a_cpu_bf16_mixed(tiny_mnist, in_tmp_path, monkeypatch):
    trainers = trainers_with(monkeypatch)
    with pytest.warns(UserWarning, match="16-mixed"):  # Lightning says so
        assert main(["--data-dir", str(tiny_mnist), "--fast-dev-run", "--precision", "16"]) == 0
    assert trainers[0].precision == ("16-mixed" if torch.cuda.is_available() else "bf16-mixed")


@pytest.mark.parametrize("precision", ["bf16-true", "64-true", "bf16-mixed"])
def test_a_run_in_every_precision_the_cpu_has(precision, tiny_mnist, in_tmp_path, monkeypatch):
    trainers = trainers_with(monkeypatch)
    assert (
        main(
            ["--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "2", "--precision", precision]
        )
        == 0
    )
    (trainer,) = trainers
    assert trainer.precision == precision
    dtype = {"bf16-true": torch.bfloat16, "64-true": torch.float64}.get(precision, torch.float32)
    assert trainer.lightning_module.l1.weight.dtype == dtype  # and the model summary's example image too


## Refusals: one line that says what is wrong


def failure(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run main in process; its exit status and the lines it wrote to stderr."""
    try:
        status = main(list(argv))
    except SystemExit as exit:  # argparse
        status = exit.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.splitlines()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--batch-size", "1e2"],
            "argument --batch-size: expected an integer of at least 1 and below 2147483648, got '1e2'",
        ),
        (
            ["--batch-size", "0"],
            "argument --batch-size: expected an integer of at least 1 and below 2147483648, got '0'",
        ),
        (
            ["--hidden-size", "-3"],
            "argument --hidden-size: expected an integer of at least 1 and below 2147483648, got '-3'",
        ),
        (["--lr", "0"], "argument --lr: expected a number above 0, got '0'"),
        (["--lr", "inf"], "argument --lr: expected a number above 0, got 'inf'"),
        (["--lr", "nan"], "argument --lr: expected a number above 0, got 'nan'"),
        (["--num-workers", "-1"], "argument --num-workers: expected an integer of at least 0 and below"),
        (["--max-epochs", "-5"], "argument --max-epochs: expected an integer of at least -1 and below 2147483648"),
        (["--fast-dev-run", "-1"], "argument --fast-dev-run: expected an integer of at least 0 and below 2147483648"),
        (["--num-nodes", "0"], "argument --num-nodes: expected an integer of at least 1 and below 2147483648"),
        (
            ["--max-epochs", "two"],
            "argument --max-epochs: expected an integer of at least -1 and below 2147483648, got 'two'",
        ),
        (["--limit-val-batches", "all"], "argument --limit-val-batches: expected a number of batches (10) or"),
        (["--gpus", "1", "--accelerator", "cpu"], "--gpus N already means --accelerator gpu --devices N"),
        (["--ckpt-path", "missing.ckpt"], "--ckpt-path: missing.ckpt is no checkpoint file"),
        (["--ckpt-path", "."], "--ckpt-path: . is a folder, not checkpoint file"),
        (["--seed", "-1"], "argument --seed: expected an integer of at least 0 and below 4294967296, got '-1'"),
        (["--seed", "4294967296"], "argument --seed: expected an integer of at least 0 and below 4294967296"),
    ],
)
def test_flag_values_that_cannot_be_right_are_refused_by_name(flags, message, capsys):
    status, lines = failure(capsys, *flags)
    assert status == 2
    assert lines[0].startswith("usage: ") and f"error: {message}" in lines[-1]
    assert not re.search(r"\b_\w+", lines[-1].split("error: ", 1)[1]), lines[-1]  # no name of a private function


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "banana"], "Precision 'banana' is invalid"),
        (["--limit-val-batches", "1.5"], "invalid value 1.5 for limit_val_batches"),
        (["--accelerator", "cpu", "--devices", "0,1"], "`devices` selected with `CPUAccelerator` should be an int"),
        (["--strategy", "dp"], "invalid strategy name: `strategy='dp'`"),
        (["--accelerator", "banana"], "invalid accelerator name"),
        (["--accelerator", "tpu"], "torch_xla"),
    ],
)
def test_values_that_lightning_refuses_end_in_one_error_line(flags, message, capsys, in_tmp_path):
    status, lines = failure(capsys, *flags)
    assert status == 1
    (error,) = [line for line in lines if line.startswith("error: ")]
    assert error.startswith("error: the Trainer cannot be set up as asked: ") and message in error


def test_a_gpu_asked_for_on_a_machine_without_one(capsys, in_tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    status, lines = failure(capsys, "--gpus", "1")
    assert status == 1
    (error,) = [line for line in lines if line.startswith("error: ")]
    assert "No supported gpu backend found!" in error and "leave out --gpus/--accelerator" in error


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--fast-dev-run", "--max-epochs", "--gpus", "--accelerator", "--devices", "--strategy", "--num-nodes",
        "--precision", "--lr-find", "--deterministic", "--seed", "--gradient-clip-val", "--batch-size",
        "--hidden-size", "--lr", "--num-workers", "--data-dir", "--limit-train-batches", "--limit-val-batches",
        "--ckpt-path", "--predict",
    ):  # fmt: skip
        assert re.search(rf"^  {flag}\b", out, re.MULTILINE), flag
    assert "(default: 2)" in out and "(default: ./data)" in out and "(default: 0.001)" in out


## Every flag, in a run


def test_model_and_trainer_flags_reach_the_run(tiny_mnist, in_tmp_path, capsys):
    flags = ["--data-dir", str(tiny_mnist), "--hidden-size", "32", "--lr", "0.01", "--batch-size", "25",
             "--num-workers", "1", "--max-epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "0.5",
             "--seed", "7", "--deterministic", "--gradient-clip-val", "0.5", "--precision", "bf16-mixed",
             "--accelerator", "cpu", "--devices", "1", "--strategy", "auto", "--num-nodes", "1"]  # fmt: skip
    assert main(flags) == 0
    checkpoint = torch.load(best_checkpoint(capsys.readouterr().out), weights_only=False)
    assert checkpoint["hyper_parameters"] == {
        "input_size": 784,
        "hidden_size": 32,
        "learning_rate": 0.01,
        "batch_size": 25,
        "num_classes": 10,
        "data_dir": str(tiny_mnist),
        "num_workers": 1,
    }
    assert checkpoint["global_step"] == 3  # --limit-train-batches 3, one epoch
    assert checkpoint["state_dict"]["l1.weight"].shape == (32, 784)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01


def test_limit_val_batches_0_trains_without_validation_and_tests_the_last_weights(tiny_mnist, in_tmp_path, capsys):
    assert main(["--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-val-batches", "0"]) == 0
    out = capsys.readouterr().out
    assert "Best checkpoint: (none: no epoch was validated and saved; tested the last weights)" in out
    assert reported_accuracy(out) >= 90.0
    assert [path.name for path in in_tmp_path.glob("lightning_logs/version_0/checkpoints/*")] == ["last.ckpt"]


def test_lr_find_prints_and_applies_its_suggestion(tiny_mnist, in_tmp_path, capsys):
    # The finder's 100 steps stop at the end of the last epoch, so 20 epochs of 6 batches.
    assert main(["--data-dir", str(tiny_mnist), "--lr-find", "--max-epochs", "20"]) == 0
    out, err = capsys.readouterr()
    suggested = float(  # a notice, on stderr: stdout holds the results
        re.search(r"^Learning-rate finder suggests (\S+); training with it\.$", err, re.MULTILINE).group(1)
    )
    checkpoint = torch.load(best_checkpoint(out), weights_only=False)
    assert checkpoint["hyper_parameters"]["learning_rate"] == pytest.approx(suggested, rel=1e-2)
    recorded = yaml.safe_load((best_checkpoint(out).parent.parent / "hparams.yaml").read_text())
    assert recorded["learning_rate"] == checkpoint["hyper_parameters"]["learning_rate"]
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == checkpoint["hyper_parameters"]["learning_rate"]
    assert checkpoint["hyper_parameters"]["learning_rate"] != 1e-3
    # The finder's plot, its suggestion a red dot, in the run's folder and in TensorBoard.
    run_folder = in_tmp_path / "lightning_logs" / "version_0"
    plot = np.asarray(Image.open(run_folder / "lr_find.png").convert("RGB")).astype(int)
    red = (plot[..., 0] > 200) & (plot[..., 1] < 50) & (plot[..., 2] < 50)
    assert red.sum() > 20
    events = EventAccumulator(str(run_folder))
    events.Reload()
    assert [image.step for image in events.Images("lr_find")] == [0]
    assert not list(in_tmp_path.glob(".lr_find*"))  # the finder's temporary checkpoint is gone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpus_1_trains_on_the_gpu(tiny_mnist, tmp_path):
    result = run_script("--data-dir", str(tiny_mnist), "--gpus", "1", "--max-epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GPU available: True (cuda), used: True" in result.stdout + result.stderr
    assert reported_accuracy(result.stdout) >= 90.0


## The data folder


def test_missing_mnist_without_network_names_the_four_files(tmp_path):
    existing = tmp_path / "lightning_logs" / "version_0" / "keep.txt"
    existing.parent.mkdir(parents=True)
    existing.write_text("an earlier run")
    # A proxy on a closed local port makes every download fail at once, network or not.
    closed = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    result = run_script("--data-dir", str(tmp_path / "nowhere"), "--fast-dev-run", cwd=tmp_path, env=closed)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "could not be downloaded" in error and "--data-dir" in error
    assert str(Path("nowhere", "MNIST", "raw")) in error
    for name in MNIST_FILES:
        assert name in error
    assert existing.read_text() == "an earlier run"
