"""The stop policy: a stop signal is noted from a process's first line, and the run stops at the
next point where it can stop cleanly; a second signal stops it at once.

Imports no torch, so that the policy holds while torch is imported; StopOnSignal (stopping.py)
holds the stop points in Lightning's loops."""

import os
import signal

# The signals that ask a run to stop: Ctrl-C; SIGTERM, what `kill`, SLURM (scancel, the time
# limit), Kubernetes and systemd send; and SIGHUP, when the terminal or ssh session that
# started the run closes. Each stops the run the same way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_noted: list[signal.Signals] = []  # the first stop signal this process received, until the run ends


class Stopped(SystemExit):
    """A stop signal, raised where the run can stop; its exit status is 128 + the signal's number,
    what a shell or a scheduler reports for a process a signal stopped."""

    # A SystemExit, which Lightning passes on after saving last.ckpt, and which no `except
    # Exception` on the way mistakes for an error.
    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(128 + self.signal)


def note_stop_signals() -> None:
    """From now on a stop signal is noted for the next stop point, and a second one stops at once."""
    # Stopping wherever a signal lands would leave a checkpoint half-saved, or one DDP process
    # gone while the others wait for it; a second signal is for a run that no longer reaches
    # a stop point.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _note)


def _note(signum: int, frame: object) -> None:
    if _noted:
        raise Stopped(_noted[0])
    _noted.append(signal.Signals(signum))


def noted_signal() -> signal.Signals | None:
    """The stop signal this process received, if any."""
    return _noted[0] if _noted else None


def stop_if_noted() -> None:
    """A stop point: raise Stopped if a stop signal was noted."""
    if _noted:
        raise Stopped(_noted[0])


def forget_noted() -> None:
    """The run is over: a later run in this process (a notebook's, a test's) starts with no signal noted."""
    _noted.clear()


def started_by_a_launcher() -> bool:
    """Whether a launcher (torchrun, or Lightning's for the DDP processes after the first) started
    this process as one of a run's processes, which stop together at the stop points they share."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def worker_ignores_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's first step: leave the stop signals to the main process."""
    # Ctrl-C in a terminal and a scheduler's signal to the process group reach the workers too.
    # A worker that died of one would fail the main process's next batch, before it saved.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # What Lightning sets as worker_init_fn when a loader has none: it seeds each worker.
    from lightning_fabric.utilities.seed import pl_worker_init_function  # torch is loaded in a worker

    pl_worker_init_function(worker_id)
