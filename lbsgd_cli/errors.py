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
        # DataLoader workers re-raise as ``UserError(message=<traceback text>)``: keep
        # only the original one-line message, which is the text's last line.
        if message is not None:
            last = message.strip().splitlines()[-1] if message.strip() else message
            args = (last.split("UserError: ", 1)[-1],)
        super().__init__(*args)


class Preempted(Exception):
    """Raised after a preemption checkpoint was written; exits with status 3."""

    exit_code = 3


class PeerFailure(Exception):
    """Another rank of a multi-process run died or hung (see ``dist.timeout_s``); exits with status 4."""

    exit_code = 4


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0].strip()
