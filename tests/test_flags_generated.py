"""Generated command lines, valid and not: each ends in a result, one `error:` line or argparse's
refusal, never a traceback, and never leaves a run folder without a checkpoint."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_mnist import main, parse_args

NUMBERS = st.one_of(
    st.integers(-3, 5),
    st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**63, 10**20, -(10**20)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0.5", "1.5", "two", ""]),
)
NUMERIC_FLAGS = ["--hidden-size", "--lr", "--batch-size", "--num-workers", "--fast-dev-run", "--max-epochs", "--gpus",
                 "--num-nodes", "--seed", "--gradient-clip-val", "--limit-train-batches", "--limit-val-batches",
                 "--devices"]  # fmt: skip


def flag(name: str, value) -> str:
    # "--flag=value": a value that starts with "-" is not taken for a flag of its own.
    return f"{name}={value}"


@settings(max_examples=300, deadline=None)
@given(flags=st.lists(st.tuples(st.sampled_from(NUMERIC_FLAGS), NUMBERS), max_size=4))
def test_any_numbers_parse_or_are_refused_by_argparse(flags):
    argv = [flag(name, value) for name, value in flags]
    try:
        args = parse_args(argv)
    except SystemExit as exit:
        assert exit.code == 2
        return
    # What is accepted is within the bounds that torch and Lightning can take.
    for name in ("hidden_size", "batch_size", "num_workers", "fast_dev_run", "max_epochs", "gpus", "num_nodes"):
        value = getattr(args, name)
        assert value is None or (isinstance(value, int) and -1 <= value < 2**31)
    for name in ("learning_rate", "gradient_clip_val"):
        value = getattr(args, name)
        assert value is None or math.isfinite(value)


# A few values each that make a cheap run, or that a run must refuse in one line.
RUN_FLAGS = st.fixed_dictionaries(
    {},
    optional={
        "--hidden-size": st.sampled_from(["4", "0", "99999999999999999999"]),
        "--lr": st.sampled_from(["0.01", "1e30", "nan"]),
        "--batch-size": st.sampled_from(["64", "100000", "0", "99999999999999999999"]),
        "--max-epochs": st.sampled_from(["0", "1", "-2"]),
        "--limit-val-batches": st.sampled_from(["0", "1", "0.5", "1.5", "nan", "-1"]),
        "--fast-dev-run": st.sampled_from(["1", "2", "-1"]),
        "--gradient-clip-val": st.sampled_from(["0", "0.5", "-1", "inf"]),
        "--devices": st.sampled_from(["1", "0", "99999999999999999999", "banana"]),
        "--precision": st.sampled_from(["bf16-mixed", "16", "64-true", "banana"]),
        "--seed": st.sampled_from(["0", "4294967296"]),
        "--accelerator": st.sampled_from(["cpu", "banana"]),
    },
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=RUN_FLAGS)
def test_generated_runs_end_in_a_result_or_one_error_line(flags, tiny_mnist, tmp_path_factory, monkeypatch, capsys):
    cwd = tmp_path_factory.mktemp("run")
    monkeypatch.chdir(cwd)
    argv = ["--data-dir", str(tiny_mnist), "--max-epochs", "1", "--limit-train-batches", "2"]
    argv += [flag(name, value) for name, value in flags.items()]
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    finally:
        torch.use_deterministic_algorithms(False)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert status in (0, 1, 2), (argv, err)
    if status == 1:
        assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    for run in (cwd / "lightning_logs").glob("*"):
        assert list(run.glob("checkpoints/*.ckpt")), (argv, err, run)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e400"])
def test_lr_takes_no_number_that_cannot_train(value, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag("--lr", value)])
    assert "argument --lr: expected a number above 0" in capsys.readouterr().err
