"""The default run of lightning_mnist.py, written as a plain PyTorch script.

The baseline for `benchmarks/parity.py`: the same 55,000/5,000 split of the training
images, the same 784-500-10 net, fused Adam with lr 1e-3, batches of 100 built with
one gather, 2 epochs each followed by validation, then one test with the weights
that validated best. It imports no Lightning, as a hand-written script would not.

    python benchmarks/plain_mnist.py --data-dir DIR [--device cpu|cuda]
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets import MNIST

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # as in lightning_mnist.py
VAL_FRACTION, SPLIT_SEED = 1 / 12, 42  # the same validation images as lightning_mnist.py
BATCH_SIZE = 100


def load_splits(data_dir: str, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels of the train, validation and test splits, on `device`."""
    train, test = MNIST(data_dir, train=True), MNIST(data_dir, train=False)
    order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_size = round(len(order) * VAL_FRACTION)
    val_index, train_index = order.split([val_size, len(order) - val_size])
    splits = {
        "train": (train.data[train_index], train.targets[train_index]),
        "val": (train.data[val_index], train.targets[val_index]),
        "test": (test.data, test.targets),
    }
    return {name: (images.to(device), labels.to(device)) for name, (images, labels) in splits.items()}


def batches(images: torch.Tensor, labels: torch.Tensor, shuffle: bool):
    """Normalised batches, each built with one gather, on the device the data is on."""
    order = torch.randperm(len(labels), device=labels.device) if shuffle else torch.arange(len(labels))
    for index in order.split(BATCH_SIZE):
        x = images[index].unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
        yield x, labels[index]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader) -> None:
    model.train()
    for images, labels in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def evaluate(model: nn.Module, loader) -> tuple[float, float]:
    """Mean loss and accuracy over a loader, weighted by batch size."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return loss_sum / count, correct / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch.manual_seed(42)
    device = torch.device(args.device)
    data = load_splits(args.data_dir, device)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    best_acc, best_state = -1.0, None
    for epoch in range(2):
        train_epoch(model, optimizer, batches(*data["train"], shuffle=True))
        val_loss, val_acc = evaluate(model, batches(*data["val"], shuffle=False))
        print(f"epoch {epoch}: val_loss {val_loss:.4f}, val_acc {val_acc:.4f}")
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    _, test_acc = evaluate(model, batches(*data["test"], shuffle=False))
    print(f"Test accuracy: {100 * test_acc:.2f}%")


if __name__ == "__main__":
    main()
