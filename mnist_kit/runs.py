"""A run's folder, its model's arguments, its Trainer's set-up checks and its progress bar; and
Lightning's output kept to what a user can act on."""

import argparse
import inspect
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from tqdm import tqdm

from mnist_kit.checkpoints import read_checkpoint
from mnist_kit.errors import RunError, shown
from mnist_kit.flags import CHECKPOINT_FLAGS, cpu_cores

# Keep the output to what a user can act on. Lightning 2.6 advertises its cloud logger at
# every start; its own code trips a deprecation warning of newer torch; it warns that a
# checkpoints folder is not empty, which a continued run's is on purpose (a new run's never
# is: claim_run_folder); and on machines with more than 2 cores it suggests DataLoader
# workers, which would slow this script down (see mnist_loader). For data that needs
# decoding, that tip is right: delete its filter then.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)


def filter_warnings() -> None:
    """Put this script's warnings filters in front of all others (PYTHONWARNINGS=error, say)."""
    # Called by main(), not at import: filters set then would be lost when a notebook or a test
    # imports this module inside warnings.catch_warnings(), and come behind any set later.
    # Lightning's advice about a run's settings (fewer batches than the logging interval, a run
    # resumed in the middle of an epoch) is shown, and never made an error by PYTHONWARNINGS=error:
    # a run is not stopped for advice. Any other warning made an error ends in one `error:` line.
    warnings.filterwarnings("default", category=PossibleUserWarning)
    # Each filter goes in front of those before it: the ones below win over the line above.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")


filter_warnings()  # also for the processes of --strategy ddp_spawn, which import this module and never run main()


@rank_zero_only
def claim_run_folder(save_dir: Path) -> int:
    """The number N of a new save_dir/lightning_logs/version_N folder, made by this call."""
    # TensorBoardLogger takes the highest version_N it finds plus one, so two runs started at
    # once in one folder can take the same one and overwrite each other's checkpoints. A mkdir
    # either creates the folder or fails, atomically: the run whose mkdir succeeds owns it.
    # Only global rank 0 claims one (other DDP processes get None); they write nothing.
    logs = save_dir / "lightning_logs"
    if logs.is_symlink() and not logs.exists():
        raise RunError(f"{logs} links to {os.readlink(logs)}, which does not exist: mount it, or remove the link.")
    if logs.exists() and not logs.is_dir():
        raise RunError(f"{logs} is a file, where this script keeps its runs: move it away.")
    logs.mkdir(exist_ok=True)
    # The search starts after the highest plain number in use, so that runs sort in the order
    # they were made; other names (version_00, a copy's "version_1 (copy)") are left alone.
    numbers = [int(path.name[8:]) for path in logs.glob("version_*") if re.fullmatch(r"[0-9]+", path.name[8:])]
    version = max(numbers, default=-1) + 1
    while True:
        try:
            (logs / f"version_{version}").mkdir()
            return version  # a number, which Lightning's progress bar shows whole as v_num
        except FileExistsError:  # another run took it between the search and now
            version += 1


def run_logger(checkpoint: str | None) -> TensorBoardLogger:
    """The run's TensorBoard logger, which also decides where its checkpoints go: the folder of
    the run that the checkpoint continues, under the name it has now, or a new lightning_logs/version_N."""
    # A run continued from one of its own checkpoints stays in its folder, whatever that folder
    # is called or wherever it has moved: its curves go on, and RunCheckpoint finds its best.
    folder = Path(checkpoint).resolve().parent.parent if checkpoint else None
    if folder and (folder / "hparams.yaml").is_file():
        return TensorBoardLogger(folder.parent.parent, folder.parent.name, folder.name, default_hp_metric=False)
    # The HParams tab gets the accuracies that main() logs, instead of a placeholder "hp_metric".
    return TensorBoardLogger(Path.cwd(), version=claim_run_folder(Path.cwd()), default_hp_metric=False)


def discard_unused_run_folder(folder: Path | None) -> None:
    """Remove a run's folder if it holds no checkpoint: a run that stopped before saving one
    leaves nothing behind. Global rank 0 alone does, which alone writes there."""
    if folder is None or rank_zero_only.rank != 0:
        return
    if folder.is_dir() and not list(folder.glob("checkpoints/*.ckpt")):
        shutil.rmtree(folder)


@contextmanager
def refusals_explained(accelerator: str, logger: TensorBoardLogger | None = None) -> Iterator[None]:
    """Around pl.Trainer(...): Lightning's refusal of its options becomes a RunError with Lightning's
    reason, and a run folder made for the logger is removed when the Trainer cannot be set up."""
    try:
        yield
    except (MisconfigurationException, ValueError, TypeError, ImportError) as error:  # Lightning checks its arguments
        discard_unused_run_folder(logger and Path(logger.log_dir))
        hint = ""
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            hint = " This machine has no GPU that torch can use: leave out --gpus/--accelerator to train on the CPU."
        raise RunError(f"the Trainer cannot be set up as asked: {error}{hint}") from error
    except RunError:
        discard_unused_run_folder(logger and Path(logger.log_dir))
        raise


def lightning_trainer(**options) -> pl.Trainer:
    """pl.Trainer(**options), or a RunError with Lightning's reason when it refuses them."""
    with refusals_explained(options["accelerator"]):
        return pl.Trainer(**options)


def check_launch(trainer: pl.Trainer) -> None:
    """Refuse, before it starts, a run that would wait forever or overload the machine."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_nodes > 1 and not (environment and environment.creates_processes_externally):
        raise RunError(
            f"--num-nodes {trainer.num_nodes} needs the script started on each machine by a launcher that tells "
            "it its rank, such as torchrun or SLURM's srun; started alone it would wait for the other machines "
            'forever. See the README\'s section "More devices, more machines".'
        )
    cores = cpu_cores()
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
        raise RunError(
            f"--devices {trainer.num_devices} on the CPU starts {trainer.num_devices} training processes, "
            f"but this machine has {cores} CPU cores: use --devices {cores} or fewer."
        )


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar, whose v_num names a continued run's folder in full."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        # A run continued in its folder keeps the name that folder has (run_logger), which
        # Lightning would cut to its last 4 characters: v_num=on_3 for version_3.
        if trainer.logger and isinstance(trainer.logger.version, str):
            metrics["v_num"] = trainer.logger.version
        return metrics


class NotebookProgressBar(RunProgressBar):
    """Lightning's progress bar without the validation bar it draws under the training bar. A
    Jupyter notebook ignores the cursor movements that keep one bar under another, so each
    validation would leave its lines piled up; the training bar still shows val_loss and val_acc."""

    def init_validation_tqdm(self) -> tqdm:
        return tqdm(disable=True)


def progress_bar(refresh_rate: int) -> RunProgressBar:
    """The progress bar for where the run is shown: a terminal, or a Jupyter notebook."""
    return (NotebookProgressBar if "ipykernel" in sys.modules else RunProgressBar)(refresh_rate)


def note_precision(trainer: pl.Trainer, args) -> None:
    """Say so when Lightning trains in another precision than --precision asked for, and record the one it uses."""
    if trainer.precision != args.precision:
        # Lightning names the precision in full, and falls back to one the hardware has (a CPU
        # has no 16-mixed): say so, and record what the run used.
        if rank_zero_only.rank == 0:
            print(
                f"Training in precision {trainer.precision}, which Lightning chose for --precision {args.precision}.",
                file=sys.stderr,
            )
        args.precision = trainer.precision


def model_arguments(args: argparse.Namespace, model_class: type[pl.LightningModule]) -> dict:
    """The model's arguments from the command line. A continued run takes those of CHECKPOINT_FLAGS
    from its checkpoint: a flag given that contradicts them is refused, rather than silently replaced."""
    arguments = {"data_dir": args.data_dir, "num_workers": args.num_workers}
    trained = read_checkpoint(args.ckpt_path, model_class) if args.ckpt_path else {}
    defaults = inspect.signature(model_class).parameters  # a new run's, where a flag is left out
    for name, flag in CHECKPOINT_FLAGS.items():
        given, default = getattr(args, name), defaults[name].default  # given is None when the flag was left out
        if trained and given is not None and given != trained[name]:
            raise RunError(
                f"{flag} {given} contradicts the checkpoint, whose run used {flag} {trained[name]}: "
                f"leave {flag} out to continue that run, or leave --ckpt-path out to start a new one."
            )
        arguments[name] = trained.get(name, default if given is None else given)
    taken = [
        f"{flag} {trained[name]:g}"
        for name, flag in CHECKPOINT_FLAGS.items()
        if getattr(args, name) is None and name in trained
    ]
    if taken and rank_zero_only.rank == 0:
        # The sizes and the rate of the model continued, which its flags would not show.
        print(f"Continuing {shown(args.ckpt_path)} with its own {', '.join(taken)}.", file=sys.stderr)
    check_memory(arguments, model_class)
    return arguments


def check_memory(arguments: dict, model_class: type[pl.LightningModule]) -> None:
    """Refuse a model too large for this machine's memory: Linux would kill the run with no word."""
    with torch.device("meta"):
        weights = sum(parameter.numel() for parameter in model_class(**arguments).parameters())
    need = 16 * weights  # 4 bytes each for a weight, its gradient and Adam's two running averages
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: leave it to the allocator
        return
    if need > memory:
        raise RunError(
            f"a model with --hidden-size {arguments['hidden_size']} has {weights:,} weights and needs about "
            f"{need / 2**30:.1f} GiB to train, more than this machine's {memory / 2**30:.1f} GiB: use a smaller one."
        )
