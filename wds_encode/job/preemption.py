"""A stop signal (a scheduler's SIGTERM before preemption, Ctrl-C, SLURM's `--signal`) ends a run gracefully.

On the first stop signal a rank tells the job to claim no more units (`distributed.STOP_KEY`, so every
rank and every decode worker stops claiming); the units already in flight are decoded, encoded and
committed as usual, the loop ends, and the run exits 128 + the signal's number (143 for SIGTERM) with
what it committed and what is left. The grace period is a deadline: past it, or on a second signal,
the main thread is interrupted, nothing more is committed (the writer thread drops what is still
queued), the units still open are discarded (their files removed, as after any failure) and the rerun
does them. Decode workers ignore the signals (their rank decides) and die with their rank; they are started
with the signals blocked (`start_decode_workers`), so none can reach one before it ignores them.
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)   # SIGUSR1: `sbatch --signal=USR1@60`, which signals the job steps
PR_SET_PDEATHSIG = 1           # prctl(2)
DEFAULT_GRACE_SECONDS = 25.0   # inside the usual 30 s notice (Kubernetes, SLURM's KillWait, torch's agent)


class Preempted(Exception):
    """The grace period ran out (or a second signal came) before the units in flight were committed."""

    def __init__(self, signal_name: str, discarded_by_grace: bool):
        self.signal_name = signal_name
        self.signum = int(getattr(signal, signal_name))
        super().__init__(f"stopped by {signal_name}: "
                         + ("the grace period ran out" if discarded_by_grace else "a second signal came")
                         + " before the units in flight were committed; they were discarded")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: a stop signal that reaches the whole process group (a terminal's Ctrl-C,
    SLURM's `--signal`, torch's agent, which signals each rank's process group) must not kill the decode
    workers while their rank finishes the units in flight. The DataLoader's own SIGTERM at shutdown is
    ignored too, so the rank ends its workers with `stop_workers`."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def start_decode_workers(loader) -> Iterator:
    """`iter(loader)` with the stop signals blocked while it forks the decode workers, which start with
    them blocked: a worker installs torch's SIGTERM handler (which dies of a SIGTERM from anyone but
    its parent) before it runs `decode_worker_init`, and a group-wide SIGTERM landing between the two
    killed it, failing the rank. Held back, the signal is dropped when the worker ignores it, and the rank
    takes its own as soon as the workers are started."""
    with _stop_signals_blocked():
        return iter(loader)


@contextmanager
def stop_signals_ignored(stopping: bool) -> Iterator[None]:
    """Around a rank's last step after a stop signal (publishing its counts, `Job.finish`), when `stopping`:
    further stop signals are ignored. torch's agent signals each rank's process group again while it shuts
    down; with the default action back in place that killed a rank before it published, and its peers
    reported it killed, not stopped. (Without a stop, a signal here acts as it always does.)"""
    if not stopping or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _stop_signals_blocked():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def decode_worker_init(worker_id: int = 0, parent_pid: Optional[int] = None) -> None:
    """DataLoader `worker_init_fn`: ignore the stop signals (`ignore_stop_signals`; one that came while
    they were blocked is dropped), and die with the rank: a rank SIGKILLed (the OOM killer, a spot
    reclaim) cannot end its workers itself, so each asks the kernel for a SIGKILL when its parent goes
    (Linux's PR_SET_PDEATHSIG; elsewhere it notices on its next claim)."""
    ignore_stop_signals(worker_id)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if parent_pid is not None and os.getppid() != parent_pid:   # the rank died before the request took effect
        os._exit(1)


def stop_workers(iterator, wait_seconds: float = 5.0) -> None:
    """Shut down a DataLoader iterator's workers: the DataLoader's own shutdown (a sentinel, then SIGTERM,
    which they ignore), then SIGKILL for any still alive, e.g. one blocked on a job store that is gone."""
    workers = list(getattr(iterator, "_workers", ()) or ())
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        worker.join(timeout=wait_seconds)
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=wait_seconds)


class GracefulStop:
    """Context manager around one rank's encoding loop (main thread only; elsewhere it does nothing).

    `request_stop(name)` is called (on a helper thread, never inside the handler) with the signal's name;
    it must tell the job to stop claiming."""

    def __init__(self, request_stop, grace_seconds: float = DEFAULT_GRACE_SECONDS, on_deadline=None):
        self.request_stop = request_stop
        self.on_deadline = on_deadline   # called (off the main thread) when the grace period ends: stop committing
        self.grace_seconds = grace_seconds
        self.signal_name: Optional[str] = None
        self.timed_out = False
        self._previous: dict = {}
        self._timer: Optional[threading.Timer] = None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:   # a second signal, or the grace timer (through SIGINT): stop now
            if self.on_deadline is not None:
                self.on_deadline()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        threading.Thread(target=self.request_stop, args=(self.signal_name,), daemon=True,
                         name="wds-encode-stop").start()
        self._timer = threading.Timer(self.grace_seconds, self._out_of_time)
        self._timer.daemon = True
        self._timer.start()

    def _out_of_time(self) -> None:
        self.timed_out = True
        if self.on_deadline is not None:
            self.on_deadline()     # at once: the main thread may take a moment to see the interrupt
        _thread.interrupt_main()   # runs the SIGINT handler (ours) in the main thread

    def __exit__(self, exc_type, exc, _tb) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        if exc_type is KeyboardInterrupt and self.signal_name is not None:
            raise Preempted(self.signal_name, self.timed_out) from exc
        return False
