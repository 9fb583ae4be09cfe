"""Does --lr-find's rate train as well as the video's 1e-3?

For each seed, one run with `--lr-find` (the rate it chose and its test accuracy) and one
run at each fixed rate, all with the script's other defaults; then the medians over the
seeds. docs/flags.md quotes its figures.

    python benchmarks/lr_find.py --data-dir DIR [--seeds 42 0 1] [--rates 1e-3 7e-4 1.4e-3]
"""

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lightning_mnist  # the script, found in the folder above this one


def test_accuracy(data_dir: str, seed: int, max_epochs: int, **flags) -> tuple[float, float]:
    """The rate a default run trained with, and its test accuracy in percent."""
    with contextlib.redirect_stdout(sys.stderr):  # the runs' progress bars and results: stdout holds the table
        result = lightning_mnist.train_and_test(data_dir=data_dir, seed=seed, max_epochs=max_epochs, **flags)
    rate = torch.load(result.best_checkpoint, weights_only=False)["hyper_parameters"]["learning_rate"]
    return rate, 100 * result.test_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the folder that holds MNIST/raw/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    parser.add_argument("--rates", type=float, nargs="+", default=[1e-3], help="fixed rates to compare with")
    parser.add_argument("--max-epochs", type=int, default=lightning_mnist.NUM_EPOCHS)
    args = parser.parse_args()
    data_dir = os.path.abspath(args.data_dir)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    columns = ["lr-find", *(f"{rate:g}" for rate in args.rates)]
    accuracies: dict[str, list[float]] = {column: [] for column in columns}
    print(f"{'seed':>6} {'finder rate':>12} " + " ".join(f"{column:>9}" for column in columns))
    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)  # the runs' lightning_logs go to a temp folder
        for seed in args.seeds:
            chosen, accuracy = test_accuracy(data_dir, seed, args.max_epochs, lr_find=True)
            row = [accuracy] + [test_accuracy(data_dir, seed, args.max_epochs, lr=rate)[1] for rate in args.rates]
            for column, value in zip(columns, row, strict=True):
                accuracies[column].append(value)
            print(f"{seed:>6} {chosen:>12.3g} " + " ".join(f"{value:>8.2f}%" for value in row), flush=True)
    medians = [statistics.median(accuracies[column]) for column in columns]
    print(f"{'median':>6} {'':>12} " + " ".join(f"{value:>8.2f}%" for value in medians))


if __name__ == "__main__":
    main()
