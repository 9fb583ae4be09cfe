"""How fast is lightning_mnist.py next to plain PyTorch and next to the video's pipeline?

Two modes, both round-robin so that slow and fast moments of a noisy machine fall on
every variant alike; each prints per-variant medians and the medians of the per-round
ratios to the baselines.

    python benchmarks/parity.py epoch --data-dir DIR [--device cpu|cuda] [--rounds 7]
    python benchmarks/parity.py process --data-dir DIR [--device cpu|cuda] [--rounds 7]

epoch: one epoch (training, then validation) of
    a. raw       a hand-written loop: same model, optimizer and batches
    b. floor     LitNeuralNet under Trainer(barebones=True): Lightning's own loop with no
                 logging, progress bar or checkpoints, the least Lightning can cost
    c. lightning LitNeuralNet under the Trainer that `python lightning_mnist.py` builds
                 (progress bar, TensorBoard logging, pictures and checkpointing on)
    d. video     the video's pipeline: torchvision's MNIST with transforms.ToTensor()
                 through a DataLoader with num_workers=4, same model and loop as a
    b and c are timed from the start of the training epoch to its end, validation included.
process: whole processes, start to exit: `python lightning_mnist.py` with its
    defaults against `python benchmarks/plain_mnist.py`, the same job (2 epochs,
    validation each epoch, test with the best weights) written as a plain script.

On CUDA the raw loop keeps the whole dataset on the GPU: no per-batch host copies.
"""

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from plain_mnist import batches, evaluate, load_splits, train_epoch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning_mnist
import mnist_kit.data
from lightning_mnist import LitNeuralNet

## Per-epoch variants


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_raw(data: dict, device: torch.device) -> float:
    """a: the hand-written loop over tensors already on the device."""
    model = LitNeuralNet().to(device)  # the same module, used as a plain nn.Module
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as configure_optimizers makes it
    synchronize(device)
    start = time.perf_counter()
    train_epoch(model, optimizer, batches(*data["train"], shuffle=True))
    evaluate(model, batches(*data["val"], shuffle=False))
    synchronize(device)
    return time.perf_counter() - start


class EpochTimer(pl.Callback):
    """Times the first training epoch, its validation and checkpointing included."""

    seconds = None

    def on_train_epoch_start(self, trainer, pl_module):
        synchronize(pl_module.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # Lightning calls it after the epoch's validation
        synchronize(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def time_floor(data_dir: str, device: torch.device) -> float:
    """b: one epoch of the same LitNeuralNet under Lightning's barebones Trainer."""
    timer = EpochTimer()
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    trainer = pl.Trainer(barebones=True, max_epochs=1, accelerator=accelerator, devices=1, callbacks=[timer])
    trainer.fit(LitNeuralNet(data_dir=data_dir))
    return timer.seconds


def time_lightning(data_dir: str, device: torch.device) -> float:
    """c: one epoch under exactly the Trainer that the command line builds."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    args = lightning_mnist.parse_args(["--data-dir", data_dir, "--max-epochs", "1", "--accelerator", accelerator])
    trainer = lightning_mnist.build_trainer(args)
    timer = EpochTimer()
    trainer.callbacks.append(timer)
    trainer.fit(LitNeuralNet(data_dir=data_dir))
    return timer.seconds


def time_video(data_dir: str, device: torch.device) -> float:
    """d: the video's data pipeline (a PIL image per sample, ToTensor, 4 workers), loop a."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    full = datasets.MNIST(data_dir, train=True, transform=transforms.ToTensor())
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(mnist_kit.data.SPLIT_SEED))
    val_size = round(len(full) * mnist_kit.data.VAL_FRACTION)
    train_set, val_set = Subset(full, order[val_size:].tolist()), Subset(full, order[:val_size].tolist())
    train_loader = DataLoader(train_set, batch_size=100, shuffle=True, num_workers=4)
    val_loader = DataLoader(val_set, batch_size=100, shuffle=False, num_workers=4)
    model = LitNeuralNet().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def on_device(loader):
        for images, labels in loader:
            yield images.to(device), labels.to(device)

    synchronize(device)
    start = time.perf_counter()
    train_epoch(model, optimizer, on_device(train_loader))
    evaluate(model, on_device(val_loader))
    synchronize(device)
    return time.perf_counter() - start


## Reporting


def report(times: dict[str, list[float]], baselines: list[str], unit: str) -> None:
    """Each variant's median, and the medians of its per-round ratios to each baseline."""
    print(
        f"\n{'variant':<12}{'median ' + unit:>16}" + "".join(f"{'/ ' + name:>12}" for name in baselines) + "   rounds"
    )
    for name, values in times.items():
        ratios = [
            statistics.median(value / base for value, base in zip(values, times[baseline], strict=True))
            for baseline in baselines
        ]
        print(
            f"{name:<12}{statistics.median(values):>16.3f}"
            + "".join(f"{ratio:>12.3f}" for ratio in ratios)
            + "   "
            + " ".join(f"{value:.2f}" for value in values)
        )


def epoch_mode(args: argparse.Namespace) -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no banners between rounds
    device = torch.device(args.device)
    data_dir = str(Path(args.data_dir).resolve())  # the rounds run in a temp folder
    data = load_splits(data_dir, device)
    times = {"raw": [], "floor": [], "lightning": [], "video": []}
    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)  # lightning_logs of the rounds go to a temp folder
        for round_ in range(args.rounds):
            times["raw"].append(time_raw(data, device))
            times["floor"].append(time_floor(data_dir, device))
            times["lightning"].append(time_lightning(data_dir, device))
            times["video"].append(time_video(data_dir, device))
            print(
                f"round {round_ + 1}/{args.rounds}: "
                + ", ".join(f"{name} {values[-1]:.3f} s" for name, values in times.items()),
                file=sys.stderr,
            )
    report(times, ["raw", "floor"], "s/epoch")
    lightning, video = times["lightning"], times["video"]
    print(
        f"\nvideo / lightning, median of per-round ratios: {statistics.median(v / b for v, b in zip(video, lightning, strict=True)):.2f}"
    )


def process_mode(args: argparse.Namespace) -> None:
    data_dir = str(Path(args.data_dir).resolve())
    commands = {
        "plain": [sys.executable, str(ROOT / "benchmarks" / "plain_mnist.py"), "--data-dir", data_dir],
        "lightning": [sys.executable, str(ROOT / "lightning_mnist.py"), "--data-dir", data_dir],
    }
    if args.device == "cuda":
        commands["plain"] += ["--device", "cuda"]
        commands["lightning"] += ["--accelerator", "gpu"]
    times = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(args.rounds):
            for name, command in commands.items():
                start = time.perf_counter()
                subprocess.run(command, cwd=workdir, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
            print(
                f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
                file=sys.stderr,
            )
    report(times, ["plain"], "s/process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("epoch", "process"))
    parser.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    {"epoch": epoch_mode, "process": process_mode}[args.mode](args)


if __name__ == "__main__":
    main()
