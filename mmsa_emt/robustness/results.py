"""The results file of a sweep, ``results_<dataset>.csv``: ``append_rows`` (the only writer) adds one finished
trial's rows whole, under a lock; ``read_results`` (the only reader) returns the whole, valid rows; lines cut
mid-write are moved to ``results_<dataset>.csv.damaged`` (``repair_results``) and rows written again for one key to
``.replaced``, so a key never has two rows. Failed trials go to ``failures_<dataset>.jsonl``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import write_text
from ..mmsa.models import display_name
from .executors import Failure
from .plan import Rates, TrialSpec

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks, so two sweeps must not write one results file at once
    fcntl = None

KEY_COLUMNS = ["model", "dataset", "protocol", "train_rate_t", "train_rate_a", "train_rate_v", "rate_t", "rate_a",
               "rate_v", "seed", "config_hash"]
TAIL_COLUMNS = ["checkpoint", "seconds", "finished_at"]
LOG_COLUMN = "log"  # the trial's log file; after TAIL_COLUMNS (results files written before it lack it)


class DamagedResultsWarning(UserWarning):
    """A results file held lines cut mid-write or otherwise unreadable; they are not counted as finished trials."""


class ReplacedResultsWarning(UserWarning):
    """Rows written again for the same trial key; the earlier ones were moved to the ``.replaced`` side file."""


def results_path(out_dir: str | Path, dataset: str) -> Path:
    return Path(out_dir) / f"results_{dataset}.csv"


def read_results(path: str | Path) -> pd.DataFrame:
    """The whole, valid rows of a results file. Damaged lines (cut mid-write, unreadable) are left out with a
    ``DamagedResultsWarning`` naming them; ``repair_results`` (run by every sweep) moves them aside."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame()
    with _locked(path, exclusive=False):
        contents = _scan(path)
    if contents.damaged:
        warnings.warn(f"{path}: {_damage_note(contents.damaged)} left out; a sweep on this folder moves "
                      f"{_plural(len(contents.damaged), 'it', 'them')} to {_side_file(path, 'damaged')} and runs "
                      f"{_plural(len(contents.damaged), 'its trial', 'their trials')} again",
                      DamagedResultsWarning, stacklevel=2)
    keys = [key for key, _ in contents.rows]
    if len(set(keys)) < len(keys):  # written by an earlier version or by hand; append_rows never does this
        repeated = sorted({_describe(k) for k in keys if keys.count(k) > 1})
        warnings.warn(f"{path} holds several rows with the same key (trials {', '.join(repeated)}); their seeds "
                      "are counted more than once in the summary", DamagedResultsWarning, stacklevel=2)
    return _frame(contents)


def repair_results(path: str | Path) -> set[tuple]:
    """Moves the damaged lines of a results file to ``<file>.damaged`` (appended, never overwritten) with a
    ``DamagedResultsWarning`` naming the trials that run again, rewrites the file without them (temporary file +
    rename); returns the keys of its whole rows."""
    path = Path(path)
    if not path.is_file():
        return set()
    with _locked(path, exclusive=True):
        contents = _scan(path)
        if contents.damaged:
            _rewrite(path, contents.header, contents, [], replaced=[])
    return {key for key, _ in contents.rows}


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Writes one trial's rows (with a header for a new file) whole: checked first, in one write followed by
    fsync, under an exclusive lock on ``<file>.lock``. A damaged line found at the end (a writer killed mid-write)
    is moved aside first, as ``repair_results`` does; earlier rows with the same keys (a trial run again) are moved
    to ``<file>.replaced``, so the file never holds two rows for one key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    if any(list(row) != columns for row in rows):
        raise ValueError(f"rows for {path} do not all have the columns {columns}")
    lines = [_line([row[c] for c in columns]) for row in rows]
    keys = []
    for line in lines:
        problem, key = _check_line(columns, line)
        if problem:
            raise ValueError(f"refusing to write a row to {path} that could not be read back ({problem}): {line!r}")
        keys.append(key)
    if len(set(keys)) < len(keys):
        raise ValueError(f"rows for {path} repeat a key: {[_describe(k) for k in keys]}")
    with _locked(path, exclusive=True):
        contents = _scan(path)
        if contents.header is not None and contents.header != columns:
            raise ValueError(f"{path} has other columns than this sweep writes; use another --out folder")
        replaced = [(key, line) for key, line in contents.rows if key in set(keys)]  # a trial run again
        if contents.damaged or replaced:
            _rewrite(path, columns, contents, lines, replaced=replaced)
            return
        with open(path, "a", encoding="utf-8", newline="") as f:
            f.write(("" if contents.header else _line(columns)) + "".join(lines))
            f.flush()
            os.fsync(f.fileno())


@dataclass
class _Contents:
    """A results file split into its header, whole valid rows (key, line) and damaged lines."""

    header: list[str] | None = None
    rows: list[tuple[tuple, str]] = field(default_factory=list)
    damaged: list[tuple[int, bytes, tuple | None]] = field(default_factory=list)  # (line number, bytes, key if read)


def _scan(path: Path) -> _Contents:
    """Splits ``path`` into whole rows and damaged lines: a line without its final newline (cut mid-write), one
    that is not UTF-8, does not parse into the header's number of fields, or holds an invalid key or number."""
    if not path.is_file():
        return _Contents()
    data = path.read_bytes()
    pieces = data.split(b"\n")
    tail = pieces.pop()  # after the last newline: empty unless the last line was cut
    lines = [piece + b"\n" for piece in pieces] + ([tail] if tail else [])
    contents = _Contents()
    if not lines:
        return contents
    header = _decode(lines[0])
    fields = _fields(header) if header is not None and header.endswith("\n") else None
    if fields is None or not set(KEY_COLUMNS + TAIL_COLUMNS) <= set(fields) or len(set(fields)) < len(fields):
        contents.damaged = [(i, raw, None) for i, raw in enumerate(lines, 1)]
        return contents
    contents.header = fields
    for number, raw in enumerate(lines[1:], 2):
        text = _decode(raw)
        problem, key = _check_line(fields, text) if text is not None else ("not UTF-8", None)
        if problem:
            contents.damaged.append((number, raw, key or _leading_key(text)))
        else:
            contents.rows.append((key, text))
    return contents


def _decode(raw: bytes) -> str | None:
    """The text of a line, or None when it is not UTF-8 (then it is a damaged line)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _fields(text: str) -> list[str] | None:
    """The CSV fields of one line (None if it does not parse as one line)."""
    try:
        parsed = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:
        return None
    return parsed[0] if len(parsed) == 1 else None


def _line(values: Sequence[Any]) -> str:
    """One CSV line, as ``csv.writer`` writes it (ends with a newline)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


def _check_line(header: list[str], text: str) -> tuple[str, tuple | None]:
    """('', key) for a whole valid row, else (what is wrong, key if its key fields were readable)."""
    if not text.endswith("\n"):
        return "cut: no final newline", None
    if "\n" in text.rstrip("\r\n") or "\r" in text.rstrip("\r\n"):
        return "a field holds a line break", None
    fields = _fields(text)
    if fields is None or len(fields) != len(header):
        return f"{len(fields) if fields else 0} fields, the header has {len(header)}", None
    row = dict(zip(header, fields))
    key = _normal_key([row[c] for c in KEY_COLUMNS])
    if key is None:
        return "invalid key fields", None
    for column in header:
        if column in KEY_COLUMNS or column in ("checkpoint", "finished_at", LOG_COLUMN):
            if not row[column].strip():
                return f"empty {column}", key
        elif not _is_number(row[column]):
            return f"{column}={row[column]!r} is not a number", key
    return "", key


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normal_key(values: Sequence[Any]) -> tuple | None:
    """KEY_COLUMNS values in one comparable form (rates as floats, seed as int), or None if they are invalid."""
    model, dataset, protocol, *rates, seed, digest = (str(v) for v in values)
    try:
        numbers = tuple(float(r) for r in rates)
        seed_number = int(seed)
        once = float(protocol.removeprefix("train-once@")) if protocol.startswith("train-once@") else 0.0
    except ValueError:
        return None
    if not model.strip() or not dataset.strip() or not (protocol == "per-rate" or protocol.startswith("train-once@")) \
            or not all(0.0 <= r <= 1.0 for r in (*numbers, once)) or not re.fullmatch(r"[0-9a-f]+", digest):
        return None
    return (model, dataset, protocol, *numbers, seed_number, digest)


def _leading_key(text: str | None) -> tuple | None:
    """The key of a damaged line whose key fields came through (a row cut after them), else None."""
    fields = _fields(text.rstrip("\r\n") + "\n") if text else None
    return _normal_key(fields[:len(KEY_COLUMNS)]) if fields and len(fields) >= len(KEY_COLUMNS) else None


def _describe(key: tuple | None) -> str:
    """The trial a row belongs to, named as ``TrialSpec.tag`` names it."""
    if key is None:
        return "a trial whose key is unreadable"
    model, dataset, protocol, t, a, v, _, _, _, seed, _ = key
    return f"{model}-{dataset}-{protocol}-r{t:g}-{a:g}-{v:g}-seed{seed}"


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _damage_note(damaged: list[tuple[int, bytes, tuple | None]]) -> str:
    where = "; ".join(f"line {number}: " + (f"trial {_describe(key)}" if key else "key unreadable")
                      for number, _, key in damaged)
    return f"{len(damaged)} damaged {_plural(len(damaged), 'line', 'lines')} (cut mid-write or unreadable; {where})"


def _side_file(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.name}.{kind}")


def _set_aside(path: Path, kind: str, reason: str, lines: list[bytes]) -> None:
    """Appends ``lines`` byte for byte (a cut one gets a newline) to ``<path>.<kind>`` under a comment saying when,
    from where and why; synced before the results file is rewritten, so a kill in between leaves them in both
    files, never in neither."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    text = f"# {stamp}: {len(lines)} {_plural(len(lines), 'line', 'lines')} moved from {path.name}: {reason}\n"
    data = text.encode() + b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    with open(_side_file(path, kind), "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, header: list[str] | None, contents: _Contents, new_lines: list[str], *,
             replaced: list[tuple[tuple, str]]) -> None:
    """Moves the damaged lines and ``replaced`` rows to their side files, then rewrites ``path`` atomically with
    ``header``, the other whole rows and ``new_lines``."""
    if contents.damaged:
        note = _damage_note(contents.damaged)
        _set_aside(path, "damaged", note, [raw for _, raw, _ in contents.damaged])
        warnings.warn(f"{path}: {note} moved to {_side_file(path, 'damaged')}; "
                      f"{_plural(len(contents.damaged), 'its trial is', 'their trials are')} not counted as done "
                      "and run again", DamagedResultsWarning, stacklevel=3)
    if replaced:
        trials = sorted({_describe(key) for key, _ in replaced})
        _set_aside(path, "replaced", f"written again by {', '.join(trials)}", [line.encode() for _, line in replaced])
        warnings.warn(f"{path}: {len(replaced)} earlier {_plural(len(replaced), 'row', 'rows')} of "
                      f"{', '.join(trials)} (a trial run again, e.g. after a cut write or with more test rates, or "
                      f"by two sweeps at once) moved to {_side_file(path, 'replaced')}", ReplacedResultsWarning,
                      stacklevel=3)
    gone = {key for key, _ in replaced}
    kept = [line for key, line in contents.rows if key not in gone]
    if header is None:  # nothing readable was left (not even the header): the next append starts a new file
        path.unlink()
        return
    write_text(path, _line(header) + "".join(kept) + "".join(new_lines))


def _frame(contents: _Contents) -> pd.DataFrame:
    if contents.header is None:
        return pd.DataFrame()
    text = _line(contents.header) + "".join(line for _, line in contents.rows)
    return pd.read_csv(io.StringIO(text), dtype={"config_hash": str, "model": str, "dataset": str, "protocol": str})


@contextmanager
def _locked(path: Path, *, exclusive: bool) -> Iterator[None]:
    """An advisory lock on ``<path>.lock`` (a separate file, since the results file itself is replaced on repair):
    exclusive for writers, shared for readers. Without ``fcntl`` (Windows) nothing is locked."""
    lock = path.with_name(path.name + ".lock")
    if fcntl is None:
        yield
        return
    if exclusive or os.access(path.parent, os.W_OK):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    elif lock.exists():
        fd = os.open(lock, os.O_RDONLY)
    else:  # a read-only folder without a lock file: nobody who could write there has locked it
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _key_values(spec: TrialSpec, rates: Rates, digest: str) -> list[Any]:
    """The KEY_COLUMNS values of one result row."""
    return [display_name(spec.model), spec.dataset, spec.protocol, *map(float, spec.train_rates),
            *map(float, rates), spec.seed, digest]


def _row_keys(spec: TrialSpec, digest: str) -> list[tuple]:
    """The keys of the rows a finished trial leaves in the results CSV (as ``_normal_key`` reads them back)."""
    return [_normal_key(_key_values(spec, rates, digest)) for rates in spec.test_rates]


def failures_path(out_dir: str | Path, dataset: str) -> Path:
    return Path(out_dir) / f"failures_{dataset}.jsonl"


def record_failure(path: Path, spec: TrialSpec, digest: str, failure: Failure, log_file: str) -> None:
    """Appends one JSON line naming the failed trial, its error and traceback (locked, synced)."""
    entry = {"trial": spec.tag, "model": spec.model, "dataset": spec.dataset, "protocol": spec.protocol,
             "seed": spec.seed, "train_rates": list(spec.train_rates), "test_rates": [list(r) for r in spec.test_rates],
             "config_hash": digest, "attempts": failure.attempts, "error": failure.error,
             "traceback": failure.details, "log": log_file,
             "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path, exclusive=True), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_failures(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a failures file, oldest first."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _log_column_wanted(csv_path: Path) -> bool:
    """False for a results file written before rows named their log file: its columns are kept as they are."""
    if not csv_path.is_file():
        return True
    with _locked(csv_path, exclusive=False):
        header = _scan(csv_path).header
    return header is None or LOG_COLUMN in header
