"""User errors at an entry point: one `error: ...` line on stderr and exit status 2, no traceback."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2  # the process printed one line saying what is wrong (see utils.dist.launch)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def not_rank_0() -> bool:
    """Whether this process is a torchrun worker other than rank 0 (RANK from the environment,
    so also before the process group exists): it leaves an error that every rank meets alike
    (a config error, one every rank stopped on) to rank 0 to print."""
    return int(os.environ.get("RANK", 0)) != 0


def one_line(exc: BaseException) -> bool:
    """Whether the exception's message is a single line (a multi-line one is a bug's: keep its
    traceback)."""
    return len(str(exc).strip().splitlines()) == 1


@contextmanager
def user_errors(kinds: tuple[type[BaseException], ...],
                if_one_line: tuple[type[BaseException], ...] = (),
                silent: Callable[[BaseException], bool] | None = None,
                cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn the exceptions of `kinds` raised in the block into one line and exit status 2.

    if_one_line: more exception types treated so only when their message is one line (a
    multi-line one is a bug: its traceback is kept). silent(exc): print nothing (another process
    prints the line). cleanup(): run before exiting (e.g. leave the process group).
    """
    try:
        yield
    except (*kinds, *if_one_line) as exc:
        if not isinstance(exc, kinds) and not one_line(exc):
            raise
        if silent is None or not silent(exc):
            print(f"error: {first_line(exc)}", file=sys.stderr)
        if cleanup is not None:
            cleanup()
        sys.exit(EXIT_USER_ERROR)
