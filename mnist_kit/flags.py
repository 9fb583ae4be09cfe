"""The command line: every flag, its default and its checks, and the command that continues a run.

Imports no torch: --help and a mistaken flag are answered before torch is imported, in a
fraction of the seconds that takes."""

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from mnist_kit.signals import note_stop_signals


def working_folder_problem() -> str | None:
    """What is wrong with the working folder, where runs are kept: gone, or unreadable; None if nothing."""
    try:
        folder = os.getcwd()
    except FileNotFoundError:  # deleted since the shell went into it, which PWD still names
        return f"the working folder {os.environ.get('PWD', '')} no longer exists: cd into a folder that does."
    try:
        os.listdir(folder)
    except OSError as error:
        return f"the working folder {folder} cannot be read ({error.strerror}): cd into a folder you can read."
    return None


# Counts (batch size, epochs, devices, ...) are below this: larger ones overflow the sizes of torch
# and Lightning, which would crash with a traceback. A model too large for memory is refused
# sooner, by check_memory.
COUNT_LIMIT = 2**31


def _number(kind: type, minimum: float, above: bool = False, maximum: float = float("inf")):
    """An argparse type for a number of `kind` at least (or above) `minimum`, whose errors say so."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if above else value >= minimum) or not value < maximum:
            what = "an integer" if kind is int else "a number"
            bounds = f"{'above' if above else 'of at least'} {minimum}"
            bounds += f" and below {maximum}" if maximum < float("inf") else ""
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value

    return parse


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _int_or_text(text: str) -> int | str:
    """Lightning's devices: a number, or text such as "auto" or "0,1"."""
    try:
        value = int(text)
    except ValueError:
        return text
    if not -COUNT_LIMIT < value < COUNT_LIMIT:  # Lightning checks the rest
        raise argparse.ArgumentTypeError(f"expected a number of devices below {COUNT_LIMIT}, got {text!r}")
    return value


def _batches(text: str) -> int | float:
    """Lightning's limit_*_batches: a number of batches (an integer) or a fraction of them."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected a number of batches (10) or a fraction of them (0.25), got {text!r}")


PREDICT_FLAGS = {
    "predict",
    "ckpt_path",
    "accelerator",
    "devices",
    "gpus",
    "precision",
    "batch_size",
}  # what --predict uses


# The flags of the model's arguments that a continued run takes from its checkpoint (model_arguments).
CHECKPOINT_FLAGS = {"hidden_size": "--hidden-size", "learning_rate": "--lr", "batch_size": "--batch-size"}


def flag_parser(
    hidden_size: int, learning_rate: float, batch_size: int, max_epochs: int
) -> Callable[[list[str] | None], argparse.Namespace]:
    """parse_args(argv) for the command line whose defaults are these: the lesson's hyperparameters."""

    def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
        """The command line, checked; each default is shown by --help."""
        return checked(build_parser(hidden_size, learning_rate, batch_size, max_epochs), argv)

    return parse_args


def build_parser(hidden_size: int, learning_rate: float, batch_size: int, max_epochs: int) -> argparse.ArgumentParser:
    """Every flag, with its default."""
    parser = argparse.ArgumentParser(
        description="Train the tutorial's feed-forward MNIST classifier with PyTorch Lightning, "
        "or read your own pictures of digits with it (--predict).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model and data (LitNeuralNet's arguments)")
    model.add_argument(
        "--hidden-size",
        type=_number(int, 1, maximum=COUNT_LIMIT),
        default=hidden_size,
        help="units in the hidden layer",
    )
    model.add_argument(
        "--lr",
        dest="learning_rate",
        metavar="LR",
        type=_number(float, 0, above=True),
        default=learning_rate,
        help="Adam's learning rate",
    )
    model.add_argument(
        "--batch-size", type=_number(int, 1, maximum=COUNT_LIMIT), default=batch_size, help="images per batch"
    )
    model.add_argument(
        "--data-dir", default="./data", help="folder holding MNIST/raw/; MNIST is downloaded there if absent"
    )
    model.add_argument(
        "--num-workers",
        type=_number(int, 0, maximum=cpu_cores() + 1),  # each is a process: more than the cores only wait
        default=0,
        help="DataLoader worker processes, at most one per CPU core; 0 is fastest here",
    )

    # Lightning checks these values itself: main() reports what it refuses.
    trainer = parser.add_argument_group("Trainer (Lightning's arguments of the same names)")
    trainer.add_argument(
        "--fast-dev-run",
        type=_number(int, 0, maximum=COUNT_LIMIT),
        nargs="?",
        const=1,
        default=0,
        help="run N batches (1 if N is left out) of training, validation and test, to check the code",
    )
    trainer.add_argument(
        "--max-epochs",
        type=_number(int, -1, maximum=COUNT_LIMIT),
        default=max_epochs,
        help="passes over the training set; -1: no end",
    )
    trainer.add_argument(
        "--gpus",
        type=_number(int, 0, maximum=COUNT_LIMIT),
        help="the video's Trainer(gpus=N): the same as --accelerator gpu --devices N",
    )
    trainer.add_argument("--accelerator", default="auto", help="hardware to train on: cpu, gpu, cuda, mps, tpu or auto")
    trainer.add_argument(
        "--devices",
        type=_int_or_text,
        default="auto",
        help="devices per machine: a number, -1 for all, a list like 0,1, or auto",
    )
    trainer.add_argument("--strategy", default="auto", help="how to spread training over devices, e.g. ddp")
    trainer.add_argument(
        "--num-nodes",
        type=_number(int, 1, maximum=COUNT_LIMIT),
        default=1,
        help="machines taking part in distributed training",
    )
    trainer.add_argument(
        "--precision",
        default="32-true",
        help="32-true, 16-mixed, bf16-mixed, bf16-true, 64-true, ... (the video's 16 is 16-mixed)",
    )
    trainer.add_argument(
        "--lr-find",
        action="store_true",
        help="run Lightning's learning-rate finder first and train with its suggestion",
    )
    trainer.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms only, for bit-identical reruns"
    )
    trainer.add_argument(
        "--seed", type=_number(int, 0, maximum=2**32), default=42, help="seed for the weights and the shuffling"
    )
    trainer.add_argument(
        "--gradient-clip-val", type=_number(float, 0), help="clip the gradient norm to this value; 0: no clipping"
    )
    trainer.add_argument(
        "--limit-train-batches",
        type=_batches,
        help="training batches per epoch: a number or a fraction (all if not given)",
    )
    trainer.add_argument(
        "--limit-val-batches", type=_batches, help="validation batches per epoch: a number or a fraction; 0 for none"
    )
    trainer.add_argument("--ckpt-path", help="checkpoint to resume training from, or to predict with")

    use = parser.add_argument_group("use the trained model")
    use.add_argument(
        "--predict",
        nargs="+",
        metavar="FILE",
        help="print the digit each picture shows, using --ckpt-path or else the best checkpoint of the newest run "
        "in ./lightning_logs; trains nothing. --accelerator, --devices, --precision and --batch-size apply",
    )
    return parser


def checked(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The flags of argv, or argparse's exit with a usage line for a mistake that the flags show on their own."""
    # A model flag left out is None, which a continued run takes from its checkpoint and a new
    # run from the default that --help shows (model_arguments).
    args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(CHECKPOINT_FLAGS)))
    # Parsed again with nothing filled in: what the command line itself gives.
    unset = object()
    as_given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    given = [name for name, value in vars(as_given).items() if value is not unset]

    if args.predict:
        # --predict trains nothing: a flag that only training uses would be silently ignored.
        ignored = [{"learning_rate": "--lr"}.get(name, "--" + name.replace("_", "-")) for name in given
                   if name not in PREDICT_FLAGS]  # fmt: skip
        if ignored:
            parser.error(f"--predict trains nothing, so {', '.join(ignored)} would not apply: leave them out")
    elif args.ckpt_path is not None and args.lr_find:
        parser.error("--lr-find chooses the learning rate of a new run; a run continued with --ckpt-path keeps its own")
    elif args.learning_rate is not None and args.lr_find:
        parser.error("--lr-find chooses the learning rate itself: give --lr or --lr-find, not both")
    elif args.ckpt_path is not None and args.fast_dev_run:
        parser.error(
            "--fast-dev-run checks the code on new weights and saves nothing; to test a checkpoint, continue "
            "its run with --ckpt-path alone"
        )
    if args.max_epochs == 0 or args.limit_train_batches == 0:
        # Lightning would test the untrained weights and leave a run folder without a checkpoint.
        zero = "--max-epochs 0" if args.max_epochs == 0 else f"--limit-train-batches {args.limit_train_batches}"
        parser.error(f"{zero} trains nothing: give at least 1 (--max-epochs -1 trains with no end)")
    if args.gpus is not None and (args.accelerator != "auto" or args.devices != "auto"):
        parser.error("--gpus N already means --accelerator gpu --devices N; give one or the other")
    if args.ckpt_path is not None and not Path(args.ckpt_path).is_file():
        what = "is a folder, not" if Path(args.ckpt_path).is_dir() else "is no"
        parser.error(f"--ckpt-path: {args.ckpt_path} {what} checkpoint file")
    return args


def flags_to_argv(flags: dict, parse_args: Callable[[list[str]], argparse.Namespace]) -> list[str]:
    """Keyword arguments as parse_args's command line: max_epochs=1 is --max-epochs 1, True a bare flag,
    False or None none."""
    names = {"lr" if name == "learning_rate" else name for name in vars(parse_args([]))} - {"predict"}
    unknown = sorted(flags.keys() - names)
    if unknown:  # argparse would take a prefix (max_ep for --max-epochs) or say "unrecognized" with no hint
        raise TypeError(f"train_and_test() got unknown flags {unknown}; it takes {sorted(names)}")
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def resume_command(argv: list[str], checkpoint: str | Path, script: str | Path) -> str:
    """The command that continues this run from checkpoint: the Python and the script that ran,
    with the run's flags and --ckpt-path set to checkpoint, quoted for a shell."""
    flags, value_follows = [], False
    # Left out: the --ckpt-path the run was started with, if any, and --lr-find, which a continued
    # run refuses (the rate it chose is in the checkpoint). argparse takes any unambiguous start of
    # a flag's name, with its value after a space or an "=": --ckpt-path PATH, --ckpt-path=PATH,
    # --ckpt PATH, --lr-f, ... (--lr itself is the rate's flag).
    for arg in argv:
        name = arg.partition("=")[0]
        is_ckpt_path = len(name) > 2 and "--ckpt-path".startswith(name)
        is_lr_find = len(name) > 2 and name != "--lr" and "--lr-find".startswith(name)
        if not (value_follows or is_ckpt_path or is_lr_find):
            flags.append(arg)
        value_follows = is_ckpt_path and "=" not in arg
    return rerun_command([*flags, "--ckpt-path", str(checkpoint)], script)


def rerun_command(argv: list[str], script: str | Path) -> str:
    """The command that runs script with argv: the Python and the script that ran, quoted for a shell."""
    # The script as it was started; its path when main() was called from other code (a notebook, a test).
    script = sys.argv[0] if Path(sys.argv[0]).resolve() == Path(script).resolve() else str(script)
    return shlex.join([sys.executable, script, *argv])


def answer_before_imports(argv: list[str], parse_args: Callable[[list[str]], argparse.Namespace]) -> None:
    """What python lightning_mnist.py does before it imports torch: note a stop signal from now on
    (signals.py), answer --help, refuse a flag (exit status 2), or refuse a working folder that
    is gone or unreadable (exit status 1)."""
    # Ctrl-C during the seconds of `import torch` would end in a KeyboardInterrupt traceback; noted,
    # it stops the run at main()'s first stop point, with the report of every other stop.
    note_stop_signals()
    # In a deleted working folder, `import torch` kills the process with "Intel oneMKL FATAL ERROR:
    # Cannot load libtorch_cpu.so", which names nothing.
    problem = working_folder_problem()
    if problem:
        sys.exit(f"error: {problem}")
    parse_args(argv)
