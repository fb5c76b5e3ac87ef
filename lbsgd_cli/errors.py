"""User-facing errors: one line, non-zero exit, no traceback.

Anything the user can fix (a path, a config value, a checkpoint) raises
:class:`UserError`; ``lbsgd_cli.cli`` prints ``lbsgd: error: <message>`` and
exits with status 2. Programming errors keep their traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as one line."""

    exit_code = 2

    def __init__(self, *args: object, message: str | None = None) -> None:
        # A DataLoader worker's UserError is re-raised in the training process as ``UserError(<text>)``
        # (``message=<text>`` in older torch), the text being "Caught UserError in DataLoader worker ...",
        # then the worker's traceback: keep only the original one-line message, the text's last line.
        if message is None and len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught UserError"):
            message = args[0]
        if message is not None:
            last = message.strip().splitlines()[-1] if message.strip() else message
            args = (last.split("UserError: ", 1)[-1],)
        super().__init__(*args)


class Preempted(Exception):
    """Raised after a preemption checkpoint was written; exits with status 3."""

    exit_code = 3


class Interrupted(Exception):
    """A second Ctrl-C (SIGINT) while the first one's checkpoint is pending, or Ctrl-C before training
    started: the run stops at once with status 130 (128 + SIGINT, the shell's convention). The first
    Ctrl-C of a training run is a preemption: checkpoint at the next iteration, status 3."""

    exit_code = 130


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); exits with status 6.

    The previous checkpoint is intact (the write goes to a temporary file, removed on failure), so the
    same command resumes from it once space is freed."""

    exit_code = 6


class PeerFailure(Exception):
    """Another rank of a multi-process run died or hung (see ``dist.timeout_s``); exits with status 4."""

    exit_code = 4


class Diverged(Exception):
    """The loss became non-finite (a rate too large for the network, e.g. no warmup at a large ``kn``, §2.2).

    Raised before anything is written after the non-finite loss: the last checkpoint stays the one from
    before it, and ``summary.json`` says ``"diverged": true``. Exits with status 5 (in a ``-m`` sweep the
    next job still runs and ``lbsgd`` exits 5 at the sweep's end)."""

    exit_code = 5

    def __init__(self, message: str, iteration: int | None = None, lr: float | None = None) -> None:
        super().__init__(message)
        self.iteration, self.lr = iteration, lr


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0].strip()
