"""Validation of MMSA feature files (``.pkl``) before training.

An MMSA feature file is a pickled dict ``{'train': {...}, 'valid': {...},
'test': {...}}``. Being a pickle, loading it can run arbitrary code: only load
files from sources you trust. Each split holds, for N samples:

* ``text_bert`` (N, 3, L): token ids / attention mask / segment ids (BERT models)
* ``text`` (N, L, Dt): text features (non-BERT models)
* ``audio`` (N, Ta, Da), ``vision`` (N, Tv, Dv)
* ``audio_lengths``, ``vision_lengths``: N ints (unaligned data)
* ``regression_labels`` (N,) or (N, 1); SIMS also ``regression_labels_T/_A/_V``
* ``raw_text``, ``id``: N entries each

MMSA's own loader (``MMSA/data_loader.py``) indexes these keys without any
checking, so a malformed file surfaces as a ``KeyError`` / ``AttributeError``,
an index error deep inside torch, or a NaN loss many steps later.
:func:`check_feature_file` loads the pickle once and checks everything with
vectorised numpy, raising :class:`FeatureFileError` whose message names the
file, the split and the key at fault (plus the sample index / value where one
is to blame).

NaN / +-inf in ``audio`` / ``vision`` are *not* an error: they are counted in
:attr:`FeatureReport.nonfinite` so the caller can decide to zero them (see
:func:`zero_nonfinite`) with one warning, or to raise.  (MMSA's loader itself
only replaces ``-inf`` in ``audio`` by 0.)
"""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SPLITS",
    "FeatureFileError",
    "FeatureFileNotFoundError",
    "FeatureReport",
    "check_feature_file",
    "load_feature_file",
    "zero_nonfinite",
]

SPLITS: tuple[str, ...] = ("train", "valid", "test")

# Samples per block when scanning big float arrays for NaN/inf, to bound the
# size of the temporary boolean array (MOSEI train audio is ~600M values).
_CHUNK_SAMPLES = 1024


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable or malformed.

    The message always names the file, and the split / key where relevant;
    the same information is available as the attributes ``path``, ``split``
    and ``key`` (``None`` where not applicable).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        split: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.split = split
        self.key = key

    def __str__(self) -> str:  # OSError.__str__ would win in the subclass below
        return self.message


class FeatureFileNotFoundError(FeatureFileError, FileNotFoundError):
    """The feature file does not exist (also catchable as ``FileNotFoundError``)."""

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__(message, path=path)
        self.errno = errno.ENOENT
        self.strerror = message
        self.filename = os.fspath(path) if path is not None else None


@dataclass
class FeatureReport:
    """Summary of a feature file that passed :func:`check_feature_file`."""

    path: Path
    splits: dict[str, int]  # samples per split, in SPLITS order
    text_len: int  # L: tokens (text_bert) or time steps (text) per sample
    audio_shape: tuple[int, int]  # (Ta, Da) per sample
    vision_shape: tuple[int, int]  # (Tv, Dv) per sample
    # largest id in text_bert[:, 0] over all splits (compare with the vocab size); None without BERT
    max_token_id: int | None
    # (split, key) -> number of NaN/inf values in audio/vision; only non-zero counts appear
    nonfinite: dict[tuple[str, str], int] = field(default_factory=dict)


def zero_nonfinite(array: np.ndarray) -> np.ndarray:
    """Return a copy of ``array`` with NaN and +-inf replaced by 0."""
    return np.nan_to_num(np.array(array, copy=True), nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------- helpers


class _Ctx:
    """Formats error messages for one file."""

    def __init__(self, path: Path, config_hint: str) -> None:
        self.path = path
        self.hint = config_hint.strip()

    def error(
        self, what: str, split: str | None = None, key: str | None = None
    ) -> FeatureFileError:
        where = f"feature file '{self.path}'"
        if split is not None:
            where += f", split '{split}'"
        if key is not None:
            where += f", key '{key}'"
        message = f"{where}: {what}"
        if self.hint:
            message += f" [{self.hint}]"
        return FeatureFileError(message, path=self.path, split=split, key=key)


def _keys_list(mapping: Mapping[Any, Any]) -> str:
    keys = sorted(map(repr, mapping.keys()))
    return "[" + ", ".join(keys) + "]" if keys else "[] (empty)"


def _first(mask: np.ndarray) -> int:
    """Index of the first sample flagged in a boolean array (per sample or per value)."""
    flat = mask.reshape(mask.shape[0], -1).any(axis=1) if mask.ndim > 1 else mask
    return int(np.flatnonzero(flat)[0])


def _as_numeric(
    value: Any, ctx: _Ctx, split: str, key: str, *, strict: bool
) -> np.ndarray:
    """Return ``value`` as a numeric ndarray.

    ``strict``: MMSA calls ``value.astype(np.float32)`` on it, so a list is an
    error there; otherwise (labels, lengths) anything ``np.asarray`` accepts is fine.
    """
    if strict and not isinstance(value, np.ndarray):
        raise ctx.error(
            f"is a {type(value).__name__}, expected a numpy.ndarray "
            "(MMSA's loader calls .astype(np.float32) on it)",
            split,
            key,
        )
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged nested lists and the like
        raise ctx.error(
            f"cannot be read as an array ({type(exc).__name__}: {exc})", split, key
        ) from exc
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind == "O":
        try:
            return arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ctx.error(
                f"has dtype object and its entries are not numbers ({exc}); expected a numeric array",
                split,
                key,
            ) from exc
    raise ctx.error(
        f"has dtype {arr.dtype}, expected a numeric (int/float) array", split, key
    )


def _count_nonfinite(arr: np.ndarray) -> int:
    """Number of NaN/+-inf values in ``arr`` without a full-size temporary when clean."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(
            arr.sum()
        ):  # a sum of finite values may overflow, never the reverse
            return 0
    total = 0
    for start in range(0, arr.shape[0], _CHUNK_SAMPLES):
        block = arr[start : start + _CHUNK_SAMPLES]
        total += block.size - int(np.count_nonzero(np.isfinite(block)))
    return total


def _require_finite(arr: np.ndarray, ctx: _Ctx, split: str, key: str) -> None:
    if _count_nonfinite(arr):
        bad = ~np.isfinite(arr)
        raise ctx.error(
            f"contains {int(bad.sum())} NaN/inf value(s), first in sample {_first(bad)}",
            split,
            key,
        )


def _check_nonneg_ints(
    values: np.ndarray, ctx: _Ctx, split: str, key: str, what: str
) -> None:
    """``values`` (N, L): finite non-negative integers (integral floats allowed)."""
    rules = [("integers", values != np.floor(values) if values.dtype.kind == "f" else None),
             ("non-negative", values < 0)]
    for rule, bad in rules:
        if bad is not None and bad.any():
            i = _first(bad)
            raise ctx.error(f"{what} must be {rule}; sample {i} has value {values[i][bad[i]][0].item()!r}",
                            split, key)


def _shape_str(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# --------------------------------------------------------------------------- main check


def _load(path: Path, ctx: _Ctx) -> Any:
    if not path.exists():
        message = f"feature file '{path}' does not exist"
        if ctx.hint:
            message += f"; path {ctx.hint}"
        raise FeatureFileNotFoundError(message, path=path)
    if not path.is_file():
        raise ctx.error("is not a regular file")
    # The file exists, so the config found it: from here on its errors are about the file itself, not about
    # dataset_root_dir/featurePath, and carry no config hint.
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except OSError as exc:
        raise FeatureFileError(
            f"feature file '{path}' exists but cannot be read ({type(exc).__name__}: {exc})", path=path
        ) from exc
    except Exception as exc:  # UnpicklingError, EOFError, ModuleNotFoundError, ... (unpickling runs any code)
        raise FeatureFileError(_unpickling_message(path, exc), path=path) from exc


def _unpickling_message(path: Path, exc: Exception) -> str:
    """Why ``path`` could not be unpickled, with the underlying error and what usually causes it."""
    cause = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or "truncated" in str(exc):
        likely = "the file is empty or truncated (an interrupted download or copy?)"
    elif isinstance(exc, (ImportError, AttributeError)):
        likely = ("it was pickled with a class that cannot be imported here (a package or version missing from "
                  "this environment?)")
    else:
        likely = "the file is corrupt or is not a pickle (MMSA's feature files are pickled dicts)"
    return f"feature file '{path}' exists but could not be unpickled ({cause}): {likely}"


def load_feature_file(path: str | os.PathLike[str], *, config_hint: str = "") -> Any:
    """The unpickled content of an MMSA feature file, with :func:`check_feature_file`'s errors for a file that is
    missing or unreadable (its content is not checked).

    A ``.pkl`` feature file is a pickle, MMSA's own format, and unpickling it can run arbitrary code: only load
    files from sources you trust. ``config_hint`` (where the path came from) is added only when the file is
    missing; a file that exists but cannot be read or unpickled raises :class:`FeatureFileError` naming it and
    the underlying error.
    """
    path = Path(path)
    return _load(path, _Ctx(path, config_hint))


def check_feature_file(
    path: str | os.PathLike[str],
    *,
    use_bert: bool = True,
    need_lengths: bool = True,
    extra_label_keys: Sequence[str] = (),
    config_hint: str = "",
    data: Any = None,
) -> FeatureReport:
    """Validate an MMSA feature file and summarise it.

    ``use_bert``: check ``text_bert`` (N, 3, L) instead of ``text`` (N, L, Dt).
    ``need_lengths``: require ``audio_lengths`` / ``vision_lengths`` (unaligned data).
    ``extra_label_keys``: further label keys to require, e.g. SIMS'
    ``('regression_labels_T', 'regression_labels_A', 'regression_labels_V')``.
    ``config_hint``: where the path came from; appended to the error messages, except for a file that exists
    but cannot be read or unpickled (the path is right; the file is not).
    ``data``: the file's content when it is already loaded (:func:`load_feature_file`); not read again.

    Unless ``data`` is given the file is unpickled, which can run arbitrary code: see :func:`load_feature_file`.

    Raises :class:`FeatureFileNotFoundError` (a :class:`FeatureFileError` and a
    ``FileNotFoundError``) if the file is missing and :class:`FeatureFileError`
    for anything else that is wrong.  NaN/inf in audio/vision are only counted.
    """
    path = Path(path)
    ctx = _Ctx(path, config_hint)
    if isinstance(extra_label_keys, str):  # a lone "regression_labels_T" is not 19 keys
        extra_label_keys = (extra_label_keys,)
    if data is None:
        data = _load(path, ctx)

    if not isinstance(data, Mapping):
        raise ctx.error(
            f"top level is a {type(data).__name__}, expected a dict with splits {list(SPLITS)}"
        )
    missing_splits = [s for s in SPLITS if s not in data]
    if missing_splits:
        raise ctx.error(
            f"missing split(s) {missing_splits}; top-level keys present: {_keys_list(data)}",
            missing_splits[0],
        )

    text_key = "text_bert" if use_bert else "text"
    label_keys = ["regression_labels", *extra_label_keys]
    length_keys = ["audio_lengths", "vision_lengths"] if need_lengths else []
    required = [
        text_key,
        "audio",
        "vision",
        *label_keys,
        "id",
        "raw_text",
        *length_keys,
    ]

    splits: dict[str, int] = {}
    nonfinite: dict[tuple[str, str], int] = {}
    max_token_id: int | None = None
    # per-sample shapes of the first split, to compare the others against
    reference: dict[str, tuple[tuple[int, ...], str]] = {}

    for split in SPLITS:
        part = data[split]
        if not isinstance(part, Mapping):
            raise ctx.error(
                f"is a {type(part).__name__}, expected a dict of arrays", split
            )
        missing = [k for k in required if k not in part]
        if missing:
            raise ctx.error(
                f"missing key(s) {', '.join(repr(k) for k in missing)}; keys present: {_keys_list(part)}",
                split,
                missing[0],
            )

        # ---- ranks
        arrays: dict[str, np.ndarray] = {}
        text = _as_numeric(part[text_key], ctx, split, text_key, strict=True)
        if use_bert and (text.ndim != 3 or text.shape[1] != 3):
            raise ctx.error(
                f"has shape {_shape_str(text.shape)}, expected (N, 3, L) "
                "(token ids / attention mask / segment ids)",
                split,
                text_key,
            )
        if not use_bert and text.ndim != 3:
            raise ctx.error(
                f"has shape {_shape_str(text.shape)}, expected (N, L, Dt)",
                split,
                text_key,
            )
        arrays[text_key] = text
        for key, dims in (("audio", "(N, Ta, Da)"), ("vision", "(N, Tv, Dv)")):
            arr = _as_numeric(part[key], ctx, split, key, strict=True)
            if arr.ndim != 3:
                raise ctx.error(
                    f"has shape {_shape_str(arr.shape)}, expected {dims}", split, key
                )
            arrays[key] = arr
        for key in label_keys:
            arr = _as_numeric(
                part[key], ctx, split, key, strict=key != "regression_labels"
            )
            if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1)):
                raise ctx.error(
                    f"has shape {_shape_str(arr.shape)}, expected (N,) or (N, 1)",
                    split,
                    key,
                )
            arrays[key] = arr
        for key in length_keys:
            arr = _as_numeric(part[key], ctx, split, key, strict=False)
            if arr.ndim != 1:
                raise ctx.error(
                    f"has shape {_shape_str(arr.shape)}, expected (N,)", split, key
                )
            arrays[key] = arr

        # ---- sample counts
        n = text.shape[0]
        counts: dict[str, int] = {k: a.shape[0] for k, a in arrays.items()}
        for key in ("id", "raw_text"):
            try:
                counts[key] = len(part[key])
            except TypeError as exc:
                raise ctx.error(
                    f"is a {type(part[key]).__name__}, expected a sequence of N entries",
                    split,
                    key,
                ) from exc
        for key, count in counts.items():
            if count != n:
                raise ctx.error(
                    f"has {count} samples, but '{text_key}' has {n} (shape {_shape_str(text.shape)})",
                    split,
                    key,
                )
        if n == 0:
            raise ctx.error(
                f"has no samples ('{text_key}' has shape {_shape_str(text.shape)})",
                split,
                text_key,
            )
        splits[split] = n

        # ---- per-sample shapes equal across splits
        per_sample = {
            text_key: (text.shape[2],) if use_bert else text.shape[1:],
            "audio": arrays["audio"].shape[1:],
            "vision": arrays["vision"].shape[1:],
        }
        for key, shape in per_sample.items():
            if key not in reference:
                reference[key] = (shape, split)
                continue
            ref_shape, ref_split = reference[key]
            if shape != ref_shape:
                found = arrays[key].shape
                expected = (
                    ("N", 3, *ref_shape) if key == "text_bert" else ("N", *ref_shape)
                )
                raise ctx.error(
                    f"has shape {_shape_str(found)}, expected {_shape_str(expected)} "
                    f"as in split '{ref_split}' (sequence lengths and feature dims must match across splits)",
                    split,
                    key,
                )

        # ---- values
        _require_finite(text, ctx, split, text_key)
        for key in label_keys:
            _require_finite(arrays[key], ctx, split, key)
        for key in ("audio", "vision"):
            count = _count_nonfinite(arrays[key])
            if count:
                nonfinite[(split, key)] = count

        if use_bert:
            ids, mask, segments = text[:, 0, :], text[:, 1, :], text[:, 2, :]
            _check_nonneg_ints(ids, ctx, split, text_key, "token ids (text_bert[:, 0])")
            _check_nonneg_ints(
                segments, ctx, split, text_key, "segment ids (text_bert[:, 2])"
            )
            bad = (mask != 0) & (mask != 1)
            if bad.any():
                i = _first(bad)
                raise ctx.error(
                    f"attention mask (text_bert[:, 1]) must be 0/1; sample {i} has value {mask[i][bad[i]][0].item()!r}",
                    split,
                    text_key,
                )
            not_prefix = (mask[:, 1:] > mask[:, :-1]).any(axis=1)  # a 0 followed by a 1
            if not_prefix.any():
                i = _first(not_prefix)
                raise ctx.error(
                    f"attention mask (text_bert[:, 1]) must be a prefix of ones then zeros; sample {i} is "
                    f"{mask[i].astype(np.int64).tolist()}",
                    split,
                    text_key,
                )
            too_short = mask.sum(axis=1) < 2
            if too_short.any():
                i = _first(too_short)
                raise ctx.error(
                    f"attention mask (text_bert[:, 1]) must cover at least 2 tokens ([CLS] and [SEP]); "
                    f"sample {i} covers {int(mask[i].sum())}",
                    split,
                    text_key,
                )
            split_max = int(ids.max())
            max_token_id = (
                split_max if max_token_id is None else max(max_token_id, split_max)
            )

        for key, seq_key in zip(length_keys, ("audio", "vision")):
            lengths = arrays[key]
            seq_len = arrays[seq_key].shape[1]
            if lengths.dtype.kind == "f":
                bad = ~np.isfinite(lengths) | (lengths != np.floor(lengths))
                if bad.any():
                    i = _first(bad)
                    raise ctx.error(
                        f"lengths must be integers; sample {i} has length {lengths[i].item()!r}",
                        split,
                        key,
                    )
            bad = (lengths < 0) | (lengths > seq_len)
            if bad.any():
                i = _first(bad)
                value = lengths[i].item()
                raise ctx.error(
                    f"sample {i} has length {value}, outside [0, {seq_len}] "
                    f"('{seq_key}' has shape {_shape_str(arrays[seq_key].shape)})",
                    split,
                    key,
                )

    text_shape = reference[text_key][0]
    return FeatureReport(
        path=path,
        splits=splits,
        text_len=int(text_shape[0]),
        audio_shape=(int(reference["audio"][0][0]), int(reference["audio"][0][1])),
        vision_shape=(int(reference["vision"][0][0]), int(reference["vision"][0][1])),
        max_token_id=max_token_id,
        nonfinite=nonfinite,
    )
