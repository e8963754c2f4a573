"""User errors: one kind (`UserError`), one rule at every entry (`user_errors`): one `error: ...`
line on stderr, printed once under torchrun, and exit status 2, no traceback.

Every error a user can fix derives from `UserError` (ConfigError, CheckpointError, LayoutError,
SampleError, RunError, GroupError, DeviceError, InferError, CRFMissingError, TagImportError);
its message is one line that says what is wrong and how to fix it. A missing file
(FileNotFoundError) and a one-line ValueError are treated alike; a ValueError of several lines is
a bug's, and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2   # the process printed one line saying what is wrong, or left it to rank 0
EXIT_PEER_FAILED = 3  # a collective failed because another process died first (it said why)


class UserError(Exception):
    """A mistake the user can fix; the message is one line.

    all_ranks: every torchrun process meets this error alike (the same arguments, or a check
    shared by the group), so rank 0 alone reports it.
    """
    all_ranks: bool = False


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def one_line(exc: BaseException) -> bool:
    """Whether the exception's message is a single line (a multi-line one is a bug's: keep its
    traceback)."""
    return len(str(exc).strip().splitlines()) == 1


def is_user_error(exc: BaseException) -> bool:
    return (isinstance(exc, (UserError, FileNotFoundError))
            or (isinstance(exc, ValueError) and one_line(exc)))


def rank() -> int:
    """This process's torchrun rank (RANK from the environment, so also before the process group
    exists); 0 outside torchrun."""
    return int(os.environ.get("RANK", 0))


def reports(exc: BaseException) -> bool:
    """Whether this process reports `exc`: rank 0 always; another rank only an error of its own,
    not one that every rank met (`all_ranks`), which rank 0 reports for all."""
    return rank() == 0 or not getattr(exc, "all_ranks", False)


@contextmanager
def user_errors(cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """The rule of every entry: a user error raised in the block becomes one `error: ...` line on
    stderr (from the process that `reports` it) and exit status 2; cleanup() runs first (e.g.
    leave the process group). Any other exception goes on with its traceback."""
    try:
        yield
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if reports(exc):
            print(f"error: {first_line(exc)}", file=sys.stderr)
        if cleanup is not None:
            cleanup()
        sys.exit(EXIT_USER_ERROR)
