"""Robustness to random feature missing: missing-rate sweeps, AUILC tables and curves (arXiv 2208.07589, Sec. 4.4,
Tables 6-7, Figs 4-6), for EMT-DLFR and MMSA's built-in models.

Protocols, named in every output so that they are never mixed up:

- ``per-rate`` (the paper's): for each rate r, one model per seed is trained and tested with every modality
  missing at r.
- ``train-once@R``: one model per seed is trained at rate R and tested at every rate (cheaper).

One trial = one call of ``run_trial(spec, ...)`` -> result rows, with no shared state, so trials can be handed to
any executor. Each finished trial's rows are appended to ``results_<dataset>.csv`` at once, whole (``append_rows``,
the only writer; ``read_results`` is the only reader); a rerun skips the trials already there with the same config
hash (config values and the feature file's content), so an interrupted sweep resumes where it stopped. A line cut
mid-write is moved to ``results_<dataset>.csv.damaged`` and its trial runs again; tables and plots keep
configurations apart.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import mmsa_compat
from .executors import ExecutorSettings, Failure, Job, run_jobs

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks, so two sweeps must not write one results file at once
    fcntl = None

Rates = tuple[float, float, float]
METRICS: dict[str, list[tuple[str, str, float]]] = {  # MMSA key, paper label, scale to the paper's units
    "mosi": [("MAE", "MAE", 1), ("Corr", "Corr", 1), ("Mult_acc_7", "Acc-7", 100), ("Mult_acc_5", "Acc-5", 100),
             ("Has0_acc_2", "Acc-2 has0", 100), ("Non0_acc_2", "Acc-2 non0", 100),
             ("Has0_F1_score", "F1 has0", 100), ("Non0_F1_score", "F1 non0", 100)],
    "sims": [("MAE", "MAE", 1), ("Corr", "Corr", 1), ("Mult_acc_5", "Acc-5", 100), ("Mult_acc_3", "Acc-3", 100),
             ("Mult_acc_2", "Acc-2", 100), ("F1_score", "F1", 100)],
}
METRICS["mosei"] = METRICS["mosi"]
METRICS["avec2019"] = [("CCC", "CCC", 1), ("MAE", "MAE", 1), ("RMSE", "RMSE", 1), ("Pearson", "Pearson r", 1)]
LOWER_IS_BETTER = {"MAE", "RMSE"}
DEFAULT_SEEDS = (111, 1111, 11111)
KEY_COLUMNS = ["model", "dataset", "protocol", "train_rate_t", "train_rate_a", "train_rate_v", "rate_t", "rate_a",
               "rate_v", "seed", "config_hash"]
TAIL_COLUMNS = ["checkpoint", "seconds", "finished_at"]
VOLATILE_ARGS = {"config_file", "feature_hint", "model_save_path", "device", "missing_rate", "cur_seed",
                 "custom_feature", "feature_T", "feature_A", "feature_V", "train_mode"}
PROTOCOLS = ("per-rate", "train-once")
OPTIONS = {"rates": "--rates/rates", "modality_rates": "--modality-rates/modality_rates",
           "train_rate": "--train-rate/train_rate", "seeds": "--seeds/seeds", "protocol": "--protocol/protocol"}
DIGEST_CACHE = ".feature_digests.json"  # in the out folder: content digests of feature files, by path/size/mtime
SHORT_HASH = 7  # characters of a config hash in table rows and plot legends
LOG_COLUMN = "log"  # the trial's log file; after TAIL_COLUMNS (results files written before it lack it)
VALID_SCORE = "_valid_score"  # set by run_trial for --keep-checkpoints best; never written to the results
NOT_KEPT = "not kept (--keep-checkpoints none)"
KEEP_CHECKPOINTS = ("all", "best", "none")


class DamagedResultsWarning(UserWarning):
    """A results file held lines cut mid-write or otherwise unreadable; they are not counted as finished trials."""


class ReplacedResultsWarning(UserWarning):
    """Rows written again for the same trial key; the earlier ones were moved to the ``.replaced`` side file."""


def default_rates(dataset: str) -> list[float]:
    """The paper's sweep: 0.0..1.0 by 0.1 for MOSI/MOSEI, 0.0..0.5 for SIMS."""
    top = 0.5 if dataset == "sims" else 1.0
    return [round(r, 1) for r in np.arange(0.0, top + 1e-9, 0.1)]


def metrics_for(dataset: str) -> list[tuple[str, str, float]]:
    """The paper's metric layout for ``dataset`` (MOSI's for a dataset not listed)."""
    return METRICS.get(dataset, METRICS["mosi"])


def metric_columns(dataset: str) -> list[str]:
    return [key for key, _, _ in metrics_for(dataset)] + ["Loss"]


def _number(option: str, value: Any) -> float:
    """``value`` as a float; numeric strings such as '0.5' are accepted, anything else names ``option``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, str, np.integer, np.floating)):
        raise ValueError(f"{option}={value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{option}={value} is not a number") from None


def _rate(option: str, value: Any) -> float:
    """A missing rate, checked to lie in [0, 1] (NaN does not)."""
    rate = _number(option, value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{option}={value} must lie in [0, 1]")
    return rate


def _seed(option: str, value: Any) -> int:
    """A seed: a whole number that numpy's and torch's seeding take (0 <= seed < 2**32)."""
    number = _number(option, value)
    if not number.is_integer() or not 0 <= number < 2**32:
        raise ValueError(f"{option}={value} must be a whole number in [0, 2**32)")
    return int(number)


def _listed(option: str, values: Any) -> list[Any]:
    """``values`` as a non-empty list without repeats (a repeated rate or seed would run a trial twice)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{option}={values!r} must be a list")
    if not values:
        raise ValueError(f"{option} is empty")
    return list(values)


def check_settings(dataset: str, *, rates: Sequence[Any] | None = None,
                   modality_rates: Sequence[Sequence[Any]] | None = None, seeds: Sequence[Any] = DEFAULT_SEEDS,
                   protocol: str = "per-rate", train_rate: Any = 0.0) -> tuple[list[Rates], list[int], str, float]:
    """Checks a sweep's settings before anything is trained; returns (rate settings, seeds, protocol, train rate).

    Every error names the option, e.g. "--train-rate/train_rate=1.5 must lie in [0, 1]"."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"{OPTIONS['protocol']}={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    train = _rate(OPTIONS["train_rate"], train_rate)
    if modality_rates and rates is not None:
        raise ValueError(f"pass {OPTIONS['rates']} or {OPTIONS['modality_rates']}, not both")
    if modality_rates:
        option = OPTIONS["modality_rates"]
        settings = []
        for triple in _listed(option, modality_rates):
            if isinstance(triple, (str, bytes)) or not isinstance(triple, Sequence) or len(triple) != 3:
                raise ValueError(f"{option}: each setting needs three rates (text audio vision), got {triple!r}")
            settings.append(tuple(_rate(option, r) for r in triple))
    else:
        option = OPTIONS["rates"]
        listed = default_rates(dataset) if rates is None else _listed(option, rates)
        settings = [(_rate(option, r),) * 3 for r in listed]
    repeated = [s for s in settings if settings.count(s) > 1]
    if repeated:
        shown = list(repeated[0]) if modality_rates else f"{repeated[0][0]:g}"
        raise ValueError(f"{option} lists {shown} more than once")
    seed_list = [_seed(OPTIONS["seeds"], s) for s in _listed(OPTIONS["seeds"], seeds)]
    if len(set(seed_list)) < len(seed_list):
        raise ValueError(f"{OPTIONS['seeds']}={list(seeds)} lists a seed more than once")
    return settings, seed_list, protocol, train


@dataclass(frozen=True)
class TrialSpec:
    """What one trial trains and tests."""

    model: str
    dataset: str
    protocol: str  # 'per-rate' or 'train-once@R'
    seed: int
    train_rates: Rates
    test_rates: tuple[Rates, ...]

    @property
    def tag(self) -> str:
        rates = "-".join(f"{r:g}" for r in self.train_rates)
        return f"{self.model}-{self.dataset}-{self.protocol}-r{rates}-seed{self.seed}"


def plan_trials(models: Sequence[str], dataset: str, settings: Sequence[Rates], seeds: Sequence[int], *,
                protocol: str = "per-rate", train_rate: float = 0.0) -> list[TrialSpec]:
    """Every trial of a sweep, rate-major (trials at one rate share a derived feature file)."""
    if protocol == "per-rate":
        return [TrialSpec(m, dataset, "per-rate", s, r, (r,)) for m in models for r in settings for s in seeds]
    if protocol == "train-once":
        train = (float(train_rate),) * 3
        return [TrialSpec(m, dataset, f"train-once@{train_rate:g}", s, train, tuple(settings))
                for m in models for s in seeds]
    raise ValueError(f"protocol='{protocol}' is not one of per-rate, train-once")


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path, cache_file: str | Path | None = None) -> str:
    """SHA-256 of a file's content, read in chunks; cached by (resolved path, size, mtime_ns) in memory and, when
    ``cache_file`` is given, in that small JSON file (written atomically), so a large feature file is read once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    cache = _read_digest_cache(Path(cache_file)) if cache_file else {}
    entry = cache.get(str(path))
    if isinstance(entry, dict) and [entry.get("size"), entry.get("mtime_ns")] == [stat.st_size, stat.st_mtime_ns] \
            and isinstance(entry.get("sha256"), str):
        digest = entry["sha256"]
    else:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                sha.update(chunk)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            raise RuntimeError(f"{path} changed while its content digest was computed; wait until it is written")
        digest = sha.hexdigest()
        if cache_file:
            cache[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            _write_atomically(Path(cache_file), json.dumps(cache, indent=1, sort_keys=True) + "\n")
    _DIGESTS[key] = digest
    return digest


def _read_digest_cache(path: Path) -> dict[str, Any]:
    """The digest cache file's entries; an unreadable cache is reported and recomputed, never trusted."""
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        warnings.warn(f"{path} is not a readable digest cache ({error}); digests are recomputed", stacklevel=3)
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, syncs it and renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name: trials on several processes or hosts (a shared folder) may write the same file at once
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o644)  # mkstemp's is 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself is durable once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def config_hash(model: str, dataset: str, config_file: str | Path, overrides: dict | None = None, *,
                digest_cache: str | Path | None = None) -> str:
    """Hash of everything that shapes a trial except its rates and seed: the config values (feature path included)
    and the feature file's content digest (``file_digest``, cached in ``digest_cache``)."""
    args = mmsa_compat.load_config(model, dataset, config_file)
    args.update(overrides or {})
    kept = {k: v for k, v in args.items() if k not in VOLATILE_ARGS}
    feature = Path(args["featurePath"])
    kept["feature_file"] = [str(feature), file_digest(feature, digest_cache) if feature.is_file() else None]
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_trial(spec: TrialSpec, config_file: str | Path, *, out_dir: str | Path, gpu_ids: Sequence[int] = (),
              num_workers: int = 0, overrides: dict | None = None, device: str | None = None,
              log_file: str | Path | None = None, keep_checkpoint: str = "all") -> list[dict[str, Any]]:
    """Trains and tests one (model, rate, seed) and returns one row per test rate.

    ``device`` (set by the Ray executor: 'cuda:0', the task's own GPU, or 'cpu') replaces the choice from
    ``gpu_ids``; ``log_file`` receives this trial's log lines; ``keep_checkpoint``: 'none' deletes the weights once
    tested, 'best' adds the validation score (``VALID_SCORE``, the model's ``KeyEval`` at the training rates) that
    the sweep compares across seeds."""
    out_dir = Path(out_dir)
    start = time.time()
    with _trial_log(log_file):
        digest = config_hash(spec.model, spec.dataset, config_file, overrides, digest_cache=out_dir / DIGEST_CACHE)
        args = mmsa_compat.trial_args(spec.model, spec.dataset, config_file, overrides=overrides, gpu_ids=gpu_ids)
        if device is not None:
            args["device"] = torch.device(device)
        cache_dir = incomplete_dir(out_dir)
        results, checkpoint = mmsa_compat.run_missing_trial(
            args, seed=spec.seed, train_rates=spec.train_rates, test_rates=spec.test_rates,
            checkpoint=out_dir / "checkpoints" / f"{spec.tag}.pth", cache_dir=cache_dir, num_workers=num_workers)
        valid = _valid_score(args, spec, checkpoint, cache_dir, num_workers) if keep_checkpoint == "best" else None
        if keep_checkpoint == "none":
            Path(checkpoint).unlink(missing_ok=True)
            mmsa_compat.logger.info(f"{checkpoint} deleted after testing (--keep-checkpoints none)")
    seconds = round(time.time() - start, 2)
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for rates, metrics in zip(spec.test_rates, results):
        row = dict(zip(KEY_COLUMNS, _key_values(spec, rates, digest)))
        row.update({k: metrics.get(k, math.nan) for k in metric_columns(spec.dataset)})
        row.update(checkpoint=str(checkpoint) if keep_checkpoint != "none" else NOT_KEPT, seconds=seconds,
                   finished_at=finished)
        if valid is not None:
            row[VALID_SCORE] = valid
        rows.append(row)
    return rows


def incomplete_dir(out_dir: str | Path) -> Path:
    """The one shared folder of a sweep's derived feature files (incomplete views, normalized copies)."""
    return Path(out_dir) / ".incomplete"


@contextmanager
def _trial_log(log_file: str | Path | None) -> Iterator[None]:
    """Sends the lines of MMSA's logger (ours and MMSA's trainers log there) to ``log_file`` while a trial runs."""
    if log_file is None:
        yield
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [pid %(process)d] %(message)s"))
    logger = mmsa_compat.logger
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _valid_score(args: dict, spec: TrialSpec, checkpoint: Path, cache_dir: Path, num_workers: int) -> dict:
    """The trained weights' ``KeyEval`` on the validation split at the training rates (never the test split):
    what ``--keep-checkpoints best`` compares."""
    train_args = mmsa_compat._at_missing_rates(args, spec.train_rates, cache_dir)
    train_args["model_save_path"] = checkpoint
    loaders = mmsa_compat.checked_data_loader(train_args, num_workers)
    model = mmsa_compat.AMIO(train_args).to(train_args["device"])
    model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    trainer = mmsa_compat.ATIO().getTrain(train_args)
    key = str(train_args.get("KeyEval", "Loss"))
    score = trainer.do_test(model, loaders["valid"], mode="VAL")
    if key not in score:
        raise KeyError(f"KeyEval='{key}' of {spec.model} is not among its validation results {sorted(score)}")
    return {"key": key, "value": float(score[key]), "minimize": key in mmsa_compat.MINIMIZED_KEYS}


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
    _write_atomically(path, _line(header) + "".join(kept) + "".join(new_lines))


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
    return [mmsa_compat.display_name(spec.model), spec.dataset, spec.protocol, *map(float, spec.train_rates),
            *map(float, rates), spec.seed, digest]


def _row_keys(spec: TrialSpec, digest: str) -> list[tuple]:
    """The keys of the rows a finished trial leaves in the results CSV (as ``_normal_key`` reads them back)."""
    return [_normal_key(_key_values(spec, rates, digest)) for rates in spec.test_rates]


@dataclass
class SweepResult:
    results: pd.DataFrame
    summary: pd.DataFrame
    auilc: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    trained: int = 0
    failed: list[str] = field(default_factory=list)  # tags of the trials that failed in this sweep


def sweep_missing_seeds(dataset: str, config_file: str | os.PathLike,
                        overrides: dict[str, Any] | None = None) -> list[int]:
    """The per-modality seeds of the dropped steps every model of a sweep gets: ``missing_seed`` from the sweep's
    overrides, else EMT-DLFR's config entry for ``dataset``, else the authors' default. MMSA's own entries carry
    other seeds (``[1111, 1111, 1111]``), so without one value for all, models would be compared on different
    incomplete views."""
    if overrides and overrides.get("missing_seed") is not None:
        seeds = overrides["missing_seed"]
    else:
        raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
        in_config = dataset in raw.get("emt-dlfr", {}).get("datasetParams", {})
        seeds = mmsa_compat.load_config("emt-dlfr", dataset, config_file).get("missing_seed") if in_config else None
    seeds = list(seeds) if seeds is not None else list(mmsa_compat.DEFAULT_MISSING_SEEDS)
    if len(seeds) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"missing_seed={seeds!r}: three whole numbers >= 0 (text, audio, vision) are wanted")
    return seeds


def sweep(models: str | Sequence[str], dataset: str, config_file: str | Path, *, rates: Sequence[float] | None = None,
          modality_rates: Sequence[Sequence[float]] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
          protocol: str = "per-rate", train_rate: float = 0.0, out_dir: str | Path = "saved_results/robustness",
          gpu_ids: Sequence[int] = (), num_workers: int = 0, overrides: dict | None = None, progress: bool = True,
          trial_fn: Callable[..., list[dict[str, Any]]] = run_trial, echo: Callable[[str], None] = print,
          executor: str | ExecutorSettings = "local", keep_checkpoints: str = "all") -> SweepResult:
    """Runs every pending trial of a sweep, then writes and prints the tables and the plot. Every setting is
    checked before anything is trained (``check_settings``, the executor's options, and for ``run_trial`` each
    model's config with ``overrides``); damaged lines of the results file are moved aside and their trials run
    again (``repair_results``).

    ``executor``: 'local' (serial, in this process), 'ray', or an ``ExecutorSettings`` (Ray's address, CPUs and
    GPUs per trial, retries). Whatever runs the trials, this process alone writes the results file, one trial's
    rows the moment it ends; a trial that fails after its retries is recorded in ``failures_<dataset>.jsonl`` and
    named in the summary (``SweepResult.failed``), and runs again in the next sweep on this folder.
    ``keep_checkpoints``: 'all', 'best' (per model, configuration, protocol and training rates, only the weights
    of the seed with the best validation score; ``checkpoints/kept.json`` names them) or 'none'."""
    models = [models] if isinstance(models, str) else list(models)
    dataset = dataset.lower()
    settings, seeds, protocol, train_rate = check_settings(dataset, rates=rates, modality_rates=modality_rates,
                                                           seeds=seeds, protocol=protocol, train_rate=train_rate)
    runner = (executor if isinstance(executor, ExecutorSettings) else ExecutorSettings(kind=executor)).check()
    if keep_checkpoints not in KEEP_CHECKPOINTS:
        raise ValueError(f"--keep-checkpoints/keep_checkpoints={keep_checkpoints!r} is not one of "
                         f"{', '.join(KEEP_CHECKPOINTS)}")
    out_dir = Path(out_dir)
    csv_path = results_path(out_dir, dataset)
    from .normalize import sweep_normalization

    # one input for every model: the sweep's --set normalize_features, else EMT-DLFR's entry; part of each hash
    overrides = {**(overrides or {}), "normalize_features": sweep_normalization(dataset, config_file, overrides)}
    echo(f"normalize_features={str(overrides['normalize_features']).lower()} for every model of the sweep")
    # one draw of missing steps for every model: MMSA's entries carry other missing_seed values than EMT-DLFR's
    overrides["missing_seed"] = sweep_missing_seeds(dataset, config_file, overrides)
    echo(f"missing_seed={overrides['missing_seed']} for every model of the sweep")
    digests = {m: config_hash(m, dataset, config_file, overrides, digest_cache=out_dir / DIGEST_CACHE)
               for m in models}
    trials = plan_trials(models, dataset, settings, seeds, protocol=protocol, train_rate=train_rate)
    done = repair_results(csv_path)
    pending = [t for t in trials if not set(_row_keys(t, digests[t.model])) <= done]
    echo(f"{len(trials)} trials, {len(trials) - len(pending)} already in {csv_path}, {len(pending)} to run"
         + (f" on Ray ({runner.cpus_per_trial or 1} CPU, {runner.gpus_per_trial:g} GPU per trial)"
            if runner.kind == "ray" and pending else ""))
    if pending and trial_fn is run_trial:
        for model in models:  # every setting of every model checked before the first trial starts
            mmsa_compat.trial_args(model, dataset, config_file, overrides=overrides,
                                   gpu_ids=gpu_ids if runner.kind == "local" else [])
        prepare_incomplete_views(models, dataset, config_file, pending, overrides, out_dir, echo=echo)
    with_log = _log_column_wanted(csv_path)
    if not with_log:
        echo(f"{csv_path} was written without a '{LOG_COLUMN}' column; the per-trial log files are not named there")
    kwargs = {"out_dir": out_dir, "gpu_ids": list(gpu_ids) if runner.kind == "local" else [],
              "num_workers": num_workers, "overrides": overrides}
    if keep_checkpoints != "all":
        kwargs["keep_checkpoint"] = keep_checkpoints
    jobs = [Job(spec.tag, trial_fn, (spec, config_file), {**kwargs, "log_file": str(log_path(out_dir, spec))})
            for spec in pending]
    specs = {spec.tag: spec for spec in pending}
    failures: list[Failure] = []
    bar = tqdm(total=len(pending), desc=f"robustness {dataset}", unit="trial", disable=not progress or not pending)

    def finished(job: Job, rows: list[dict[str, Any]]) -> None:
        spec = specs[job.name]
        valid = [row.pop(VALID_SCORE, None) for row in rows]
        wanted = set(_row_keys(spec, digests[spec.model]))
        got = {_normal_key([row.get(c) for c in KEY_COLUMNS]) for row in rows}
        if got != wanted or len(rows) != len(wanted):
            raise ValueError(f"trial {spec.tag} returned rows for other keys than planned (config hash "
                             f"{digests[spec.model]}; did the config or the feature file change during the "
                             f"sweep?): {sorted(map(str, got))}")
        if with_log:
            for row in rows:
                row[LOG_COLUMN] = job.kwargs["log_file"]
        if keep_checkpoints == "best":
            _keep_best(out_dir, spec, digests[spec.model], rows[0]["checkpoint"], valid[0], echo=bar.write)
        append_rows(csv_path, rows)
        bar.update()
        bar.write(f"{spec.tag}: " + ", ".join(f"rate {r['rate_t']:g}/{r['rate_a']:g}/{r['rate_v']:g} MAE "
                                              f"{r['MAE']:.4f}" for r in rows))

    def failed(failure: Failure) -> None:
        spec = specs[failure.job.name]
        record_failure(failures_path(out_dir, dataset), spec, digests[spec.model], failure,
                       failure.job.kwargs["log_file"])
        failures.append(failure)
        bar.update()
        bar.write(f"{spec.tag}: FAILED after {failure.attempts} "
                  f"{_plural(failure.attempts, 'attempt', 'attempts')}: {failure.error}")

    with bar:
        run_jobs(jobs, runner, finished, failed)
    failed_tags = [f.job.name for f in failures]
    if failures:
        echo(f"\n{len(failures)} of {len(pending)} {_plural(len(pending), 'trial', 'trials')} failed (errors in "
             f"{failures_path(out_dir, dataset)}; they run again in the next sweep on this folder): "
             + "; ".join(f"{f.job.name}: {f.error}" for f in failures))
        if read_results(csv_path).empty:
            raise RuntimeError(f"every trial of the sweep failed; see {failures_path(out_dir, dataset)} and the "
                               f"logs in {out_dir / 'logs'}")
    result = report(out_dir, dataset, echo=echo, trained=len(pending) - len(failures))
    result.failed = failed_tags
    if failures:
        echo(f"NOTE: {len(failures)} failed {_plural(len(failures), 'trial is', 'trials are')} missing from these "
             f"tables: {', '.join(failed_tags)}")
    return result


def log_path(out_dir: str | Path, spec: TrialSpec) -> Path:
    """One log file per trial (a retried or resumed trial appends to it)."""
    return Path(out_dir) / "logs" / f"{spec.tag}.log"


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


def prepare_incomplete_views(models: Sequence[str], dataset: str, config_file: str | Path,
                             trials: Sequence[TrialSpec], overrides: dict, out_dir: Path,
                             echo: Callable[[str], None] = print) -> list[Path]:
    """Writes, before any trial starts, the derived feature files (``mmsa_emt.missing``) of the models that do not
    read MMSA's incomplete view themselves, once per (feature file, rates), into the sweep's shared folder; the
    trials then find them there instead of each writing its own."""
    written = []
    for model in models:
        if mmsa_compat.reads_incomplete_view(model):
            continue
        args = mmsa_compat.load_config(model, dataset, config_file)
        args.update(overrides)
        needed = sorted({r for t in trials if t.model == model for r in (t.train_rates, *t.test_rates)})
        for rates in needed:
            at = mmsa_compat._at_missing_rates(args, rates, incomplete_dir(out_dir))
            written.append(Path(at["featurePath"]))
    if written:
        echo(f"{len(set(written))} incomplete-view feature files ready in {incomplete_dir(out_dir)}")
    return written


def _keep_best(out_dir: Path, spec: TrialSpec, digest: str, checkpoint: str, valid: dict | None, *,
               echo: Callable[[str], None]) -> None:
    """``--keep-checkpoints best``: keeps the weights of the seed with the best validation score per (model,
    configuration, protocol, training rates), deletes the others, and names the kept ones in
    ``checkpoints/kept.json`` (written atomically before anything is deleted)."""
    if not valid:
        raise ValueError(f"trial {spec.tag} returned no validation score; --keep-checkpoints best needs one "
                         "(run_trial(keep_checkpoint='best') adds it)")
    kept_file = out_dir / "checkpoints" / "kept.json"
    kept_file.parent.mkdir(parents=True, exist_ok=True)
    rates = "-".join(f"{r:g}" for r in spec.train_rates)
    group = f"{spec.model}|{spec.dataset}|{digest}|{spec.protocol}|train {rates}"
    with _locked(kept_file, exclusive=True):
        kept = json.loads(kept_file.read_text(encoding="utf-8")) if kept_file.is_file() else {}
        best = kept.get(group)
        if best is None or best["checkpoint"] == checkpoint:  # the first, or the same trial run again
            better = True
        else:
            better = valid["value"] < best["valid"] if valid["minimize"] else valid["value"] > best["valid"]
        if better:
            kept[group] = {"checkpoint": checkpoint, "trial": spec.tag, "KeyEval": valid["key"],
                           "valid": valid["value"]}
            _write_atomically(kept_file, json.dumps(kept, indent=1, sort_keys=True) + "\n")
            loser = best["checkpoint"] if best is not None and best["checkpoint"] != checkpoint else None
        else:
            loser = checkpoint
        if loser:
            Path(loser).unlink(missing_ok=True)
            echo(f"{group}: deleted {loser} (its valid {valid['key']} is not the best of the seeds)")


def summarize(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Mean and std over seeds per (model, configuration, protocol, rates), in the paper's units. Rows of different
    config hashes are never averaged together: where a model has more than one, its rows are labelled
    ``MODEL [abc1234]`` (short hash); the full hash is the last column, ``config_hash``."""
    scales = {key: scale for key, _, scale in metrics_for(dataset)}
    metrics = [m for m in scales if m in frame]
    scaled = frame.assign(**{m: frame[m] * scales[m] for m in metrics})
    if "config_hash" not in scaled:
        scaled = scaled.assign(config_hash="")
    groups = scaled.groupby(["model", "config_hash", "protocol", "rate_t", "rate_a", "rate_v"], sort=True,
                            dropna=False)[metrics]
    table = groups.mean().join(groups.std(ddof=0).add_suffix("_std")).join(groups.size().rename("seeds"))
    table = table.reset_index()
    table["model"] = config_labels(table)
    return table[[c for c in table if c != "config_hash"] + ["config_hash"]]


def config_labels(frame: pd.DataFrame) -> pd.Series:
    """Each row's model name, followed by its short config hash where that model has rows of several hashes."""
    hashes = frame.config_hash.astype(str)
    several = hashes.groupby(frame.model).transform("nunique") > 1
    width = SHORT_HASH
    while width < hashes.str.len().max() and hashes.str[:width].nunique() < hashes.nunique():
        width += 1  # two hashes that share their first characters get more of them
    return frame.model.where(~several, frame.model + " [" + hashes.str[:width] + "]")


def auilc(rates: Sequence[float], values: Sequence[float]) -> float:
    """Area under the metric-vs-missing-rate curve: the trapezoid rule over the rates actually run."""
    order = np.argsort(rates)
    return float(np.trapezoid(np.asarray(values, dtype=float)[order], np.asarray(rates, dtype=float)[order]))


def auilc_table(summary: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per (model, configuration, protocol): AUILC of the seed-mean curve for each metric, over
    uniform-rate settings; ``summary`` is ``summarize``'s table (model names already carry a short hash where
    needed)."""
    uniform = summary[(summary.rate_t == summary.rate_a) & (summary.rate_a == summary.rate_v)]
    rows = []
    if "config_hash" not in uniform:
        uniform = uniform.assign(config_hash="")
    for (model, protocol, digest), group in uniform.groupby(["model", "protocol", "config_hash"], sort=True,
                                                             dropna=False):
        if len(group) < 2:
            continue
        rates = group.rate_t.to_numpy()
        row = {"model": model, "protocol": protocol,
               "rates": f"{rates.min():g}-{rates.max():g} ({len(rates)} rates)"}
        for key, label, _ in metrics_for(dataset):
            if key in group:
                row[label] = auilc(rates, group[key].to_numpy())
        row["config_hash"] = digest
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-style table (no extra dependency)."""
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in frame.to_numpy()]
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    return "\n".join([header, rule, *("| " + " | ".join(r) + " |" for r in cells)])


def plot_curves(summary: pd.DataFrame, dataset: str, protocol: str, path: Path) -> Path:
    """Each metric against the missing rate: seed-mean line with a std band, one colour per model and
    configuration (the legend names the short config hash where a model has several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = summary[(summary.protocol == protocol) & (summary.rate_t == summary.rate_a)
                   & (summary.rate_a == summary.rate_v)]
    metrics = [(k, label) for k, label, _ in metrics_for(dataset) if k in data]
    cols = 4 if len(metrics) > 6 else 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics):
        for i, ((model, _), group) in enumerate(data.groupby(["model", "config_hash"], sort=True, dropna=False)):
            group = group.sort_values("rate_t")
            x, y, s = group.rate_t.to_numpy(), group[key].to_numpy(), group[f"{key}_std"].to_numpy()
            ax.plot(x, y, marker="o", ms=3, color=f"C{i}", label=model)
            ax.fill_between(x, y - s, y + s, color=f"C{i}", alpha=0.2)
        ax.set_title(label + (" (lower is better)" if key in LOWER_IS_BETTER else ""))
        ax.set_xlabel("missing rate")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle(f"{dataset.upper()}: robustness to random feature missing ({protocol}; mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out_dir: str | Path, dataset: str, *, echo: Callable[[str], None] = print,
           trained: int = 0) -> SweepResult:
    """Tables (terminal, CSV, Markdown) and one PNG per protocol from everything in ``results_<dataset>.csv``."""
    out_dir = Path(out_dir)
    frame = read_results(results_path(out_dir, dataset))
    if frame.empty:
        raise FileNotFoundError(f"no results in {results_path(out_dir, dataset)}")
    summary, files = summarize(frame, dataset), {}
    table = auilc_table(summary, dataset)
    for protocol in sorted(summary.protocol.unique()):
        stem = f"{dataset}_{protocol}"
        part = summary[summary.protocol == protocol]
        files[f"summary {protocol}"] = _save(part, out_dir / f"summary_{stem}")
        files[f"plot {protocol}"] = plot_curves(summary, dataset, protocol, out_dir / f"robustness_{stem}.png")
        echo(f"\n{dataset.upper()} [{protocol}] metric per missing rate (mean over seeds; accuracies and F1 in %):")
        cols = ["model", "rate_t", "rate_a", "rate_v", "seeds",
                *[k for k, _, _ in metrics_for(dataset) if k in part]]
        echo(part[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        auilc_part = table[table.protocol == protocol] if not table.empty else table
        if not auilc_part.empty:
            files[f"auilc {protocol}"] = _save(auilc_part, out_dir / f"auilc_{stem}")
            echo(f"\n{dataset.upper()} [{protocol}] AUILC (trapezoid over the rates run; MAE/Corr as they are, "
                 "accuracies and F1 in %):")
            echo(auilc_part.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    echo("\n" + "\n".join(f"{name}: {path}" for name, path in files.items()))
    return SweepResult(results=frame, summary=summary, auilc=table, files=files, trained=trained)


def _save(frame: pd.DataFrame, stem: Path) -> Path:
    """Writes <stem>.csv and <stem>.md (stems hold dots, as in 'train-once@0.5': no with_suffix)."""
    stem.parent.joinpath(stem.name + ".md").write_text(to_markdown(frame) + "\n")
    frame.to_csv(stem.parent / (stem.name + ".csv"), index=False)
    return stem.parent / (stem.name + ".csv")
