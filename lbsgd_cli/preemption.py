"""Preemption: a signal turned into a checkpoint at an iteration boundary, from the process's first moment.

On a cluster a preemption can come at any time: while the ranks import torch, load the data, wait for each
other at the rendezvous, or train. SLURM's ``--signal=USR2@N``, ``scancel --signal=USR2`` and a preemption's
SIGTERM all kill a process that has no handler yet. So ``lbsgd train`` calls :func:`catch_early` before it
imports anything heavy: the signal is only remembered, and :class:`PreemptionFlag`, built when the loop
starts, takes it over; the first check in the loop then writes the checkpoint, the job requeues itself
(``dist.requeue``) and resumes like any preempted run. The paper has no rule here; its runs were not
preempted (§5: a 256-GPU run of about an hour).
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from .errors import UserError  # light: catch_early runs before torch is imported

# The signals a default config treats as a preemption (checkpoint.preempt_signals' default)
EARLY_SIGNALS = ("SIGTERM", "SIGUSR2")


class _Early:
    def __init__(self) -> None:
        self.signal: str | None = None  # the first preemption signal caught before the loop started
        self.previous: dict[int, Any] = {}  # the handlers catch_early replaced


_early = _Early()


def _remember(signum, frame) -> None:
    if _early.signal is None:
        _early.signal = signal.Signals(signum).name
        print(f"lbsgd: {_early.signal} during start-up: a checkpoint follows at the first iteration check",
              file=sys.stderr, flush=True)


def catch_early(names: tuple[str, ...] = EARLY_SIGNALS) -> None:
    """Remember the first of ``names`` that arrives from now on, instead of dying of it (call first thing)."""
    for name in names:
        sig = getattr(signal, name, None)
        if sig is None:  # no such signal on this platform
            continue
        try:
            old = signal.signal(sig, _remember)
        except ValueError:  # not the main thread: leave signals alone
            continue
        _early.previous.setdefault(sig, old)


def early_signal() -> str | None:
    """The signal caught during start-up, if any."""
    return _early.signal


def forget_early() -> None:
    """Forget a start-up signal and give back the handlers :func:`catch_early` replaced (``lbsgd train``'s end,
    so that a process that goes on, a test's, gets its own signals back)."""
    for sig, old in _early.previous.items():
        if signal.getsignal(sig) is _remember:
            signal.signal(sig, old)
    _early.signal, _early.previous = None, {}


class PreemptionFlag:
    """Turns the configured signals into a checkpoint at an iteration boundary.

    SIGINT (Ctrl-C) is always one of them: the first checkpoints and exits with status 3 as a preemption
    does; a second one, before that checkpoint is written, raises ``KeyboardInterrupt`` and the run stops
    at once (status 130, :class:`~lbsgd_cli.errors.Interrupted`). One process reads its flag at every
    iteration. Several processes agree by an allreduce of the flag,
    which is a host value, so only every ``check_every`` iterations and at every scheduled checkpoint:
    the preemption checkpoint is written within ``check_every`` iterations of the signal, by all ranks
    at the same iteration."""

    def __init__(self, names: list[str], check_every: int = 1) -> None:
        self.raised: str | None = None  # the first signal's name: why the run stops
        self.interrupted = False  # a Ctrl-C came: the next one stops at once
        self.check_every = max(1, check_every)
        self._old: dict[int, Any] = {}
        wanted = [*names, *(["SIGINT"] if "SIGINT" not in names else [])]  # Ctrl-C: always
        for name in wanted:
            sig = getattr(signal, name, None)
            if sig is None:
                raise UserError(f"checkpoint.preempt_signals: unknown signal {name!r}")
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        early = _early.signal
        if early is not None and early in wanted:  # a preemption during start-up: checkpoint at the first check
            self.raised = early
        elif early is not None:  # caught early, but this run does not treat it as a preemption: what it would do
            sig = getattr(signal, early)
            _early.signal = None
            signal.signal(sig, _early.previous.get(sig, signal.SIG_DFL))
            signal.raise_signal(sig)

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # Ctrl-C: the first checkpoints and stops, a second stops at once
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            print("lbsgd: Ctrl-C: writing a checkpoint at the next iteration, then stopping (status 3); "
                  "Ctrl-C again stops at once", file=sys.stderr, flush=True)
        # the first reason stays: `scontrol requeue` sends SIGTERM to a job that is already stopping
        self.raised = self.raised or name

    def agreed(self, device, iteration: int | None = None, force: bool = False) -> bool:
        """True on every rank when any rank got a signal (one tiny allreduce with several processes, at
        iterations that are multiples of ``check_every``, when ``force``d, or when no iteration is given)."""
        import torch  # imported by now (the loop runs); not at module level, so that catch_early stays light

        from . import distributed as D

        if D.initialized():
            if not force and iteration is not None and iteration % self.check_every:
                return False
            t = torch.tensor([1.0 if self.raised else 0.0], device=device)
            D.dist.all_reduce(t, op=D.dist.ReduceOp.MAX)
            if t.item() and not self.raised:
                self.raised = "a signal on another rank"
            return bool(t.item())
        return self.raised is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def hold(self) -> None:
        """Keep catching the signals until the process exits (``restore`` then leaves them alone): the process
        is leaving with status 3 and a signal now (SLURM's SIGTERM after a requeue) must not kill it first."""
        self._old.clear()
