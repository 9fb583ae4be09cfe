"""The benchmarks still run and report every variant (their timings are not asserted)."""

import os
import re
import subprocess
import sys

from conftest import ROOT, reported_accuracy


def run_benchmark(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_plain_script_does_the_same_job_without_lightning(tiny_mnist, tmp_path):
    result = run_benchmark("plain_mnist.py", "--data-dir", str(tiny_mnist), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^epoch \d: val_loss", result.stdout, re.MULTILINE)) == 2
    assert reported_accuracy(result.stdout) >= 90.0
    probe = "import sys, plain_mnist; print(sorted(m for m in sys.modules if 'lightning' in m))"
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT / "benchmarks", capture_output=True, text=True, check=True
    )
    assert imported.stdout.strip() == "[]"  # a plain script: no Lightning in the process


def test_parity_epoch_mode_times_all_three_variants(tiny_mnist, tmp_path):
    data_dir = os.path.relpath(tiny_mnist, tmp_path)  # relative, as users type it; the rounds run elsewhere
    result = run_benchmark("parity.py", "epoch", "--data-dir", data_dir, "--rounds", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for variant in ("raw", "floor", "lightning", "video"):  # the median, and the ratios to raw and to floor
        assert re.search(rf"^{variant} +\d+\.\d+ +\d+\.\d+ +\d+\.\d+ ", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^video / lightning, median of per-round ratios: \d+\.\d\d$", result.stdout, re.MULTILINE)
    assert not list(tmp_path.iterdir())  # the rounds' lightning_logs went to a temp folder


def test_parity_process_mode_times_both_processes(tiny_mnist, tmp_path):
    result = run_benchmark("parity.py", "process", "--data-dir", str(tiny_mnist), "--rounds", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for variant in ("plain", "lightning"):
        assert re.search(rf"^{variant} +\d+\.\d+ +\d+\.\d+", result.stdout, re.MULTILINE), result.stdout


def test_lr_find_benchmark_compares_the_finders_rate_with_fixed_ones(tiny_mnist, tmp_path):
    # 20 epochs of the tiny MNIST's 6 batches: enough steps for the finder's 100.
    args = ("--data-dir", str(tiny_mnist), "--seeds", "0", "--rates", "1e-3", "3e-3", "--max-epochs", "20")
    result = run_benchmark("lr_find.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = re.search(r"^ +0 +(\S+) +(\d+\.\d\d)% +(\d+\.\d\d)% +(\d+\.\d\d)%$", result.stdout, re.MULTILINE)
    assert row, result.stdout
    assert 1e-8 < float(row.group(1)) < 1  # the finder's range
    assert all(float(accuracy) >= 80 for accuracy in row.groups()[1:])
    assert re.search(r"^median +\d+\.\d\d% +\d+\.\d\d% +\d+\.\d\d%$", result.stdout, re.MULTILINE)
    assert len(result.stdout.splitlines()) == 3  # the table alone: the runs' own output went to stderr
    assert not list(tmp_path.iterdir())  # the runs' lightning_logs went to a temp folder
