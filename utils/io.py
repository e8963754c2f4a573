"""Atomic file writes: a temp file beside the target, flushed to disk, then os.replace, so a
reader (or a resumed run after a crash or SIGKILL) sees the old file or the new one, never half of
one. Temp files are hidden (`.<name>.<random>.tmp`); `remove_stale_tmp` deletes those a killed
writer left behind."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", durable: bool = False) -> Iterator[IO]:
    """Open a temp file in `path`'s folder (created if needed) for writing ("w" or "wb"); when the
    block ends, os.replace it onto `path`. The file gets the usual mode (0666 & ~umask); on any
    error the temp file is removed and `path` is left as it was. durable: also fsync the file and
    the folder (checkpoints; not for the thousands of prediction PNGs of an evaluation)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 durable: bool = True) -> None:
    """`write(f)` into `atomic_open(path, "wb", durable)`."""
    with atomic_open(path, "wb", durable) as f:
        write(f)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files a killed writer left in `folder` (SIGKILL skips the cleanup)."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{TMP_SUFFIX}")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
