"""Atomic file writes: a reader sees the old file or the new one whole, never a part, and a write that fails or
is killed leaves the old file as it was.

Every file the package writes over (configs, feature files, checkpoints, results) goes through ``atomic_file``.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

NEW_FILE_MODE = 0o644  # mkstemp creates 0600; a new file gets what ``open`` gives under the usual umask 022


@contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` for writing (``mode`` 'w': UTF-8 text, newlines as written; 'wb':
    bytes); when the block ends, syncs it, gives it the permissions of the file it replaces (a new file: 0644) and
    renames it over ``path``. The temporary name is unique, so processes (or hosts sharing a folder) writing the
    same file at once each rename a whole file of their own: one of them is left. If the block raises, the
    temporary file is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file mode={mode!r}: 'w' or 'wb' is wanted")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.is_file() else NEW_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """``text`` written to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as handle:
        handle.write(text)


def _sync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (POSIX; elsewhere the rename is left to the file system)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
