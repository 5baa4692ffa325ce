"""Per-feature standardisation of audio and vision features with train-split statistics, as the EMT-DLFR authors
prepared CH-SIMS (their ``unaligned_39_normalized.pkl``, read by their SIMS runs).

For each modality separately and each feature, the mean and the standard deviation (population, ddof=0) are taken
over the *valid frames* (frame index < ``<modality>_lengths``) of the ``train`` split; every split's valid frames
become ``(x - mean) / (std + 1e-6)``; padded frames are left as they are; text is not touched. The arithmetic is
numpy's ``mean``/``std`` over the packed valid frames in the file's own dtype, the same operations on the same
array as the authors' procedure, so the results are equal to theirs (float32 for MMSA's files).

Decisions where the authors' procedure is silent or would go wrong:

- a feature whose train std is 0 is divided by 1e-6 (finite, as theirs); a warning names it when another split
  holds other values for it, which then become large;
- NaN/inf in a valid frame of a normalized modality is an error (the statistics would turn every value of that
  feature into NaN); NaN/inf in padded frames are left as they are;
- a length outside ``[0, frames]``, a non-float feature array or a train split without valid frames is an error
  naming the file, split and key.

``normalize_features`` works on loaded content and never changes it (new arrays for the normalized keys);
``normalize_file`` writes a normalized copy of a file atomically; ``normalized_file`` caches one for sweeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_file
from .data_check import SPLITS, FeatureFileError, load_feature_file

__all__ = ["DEFAULT_MODALITIES", "EPS", "SETTING", "STATS_SPLIT", "NormalizationReport", "normalize_features",
           "normalize_file", "normalize_setting", "normalized_file", "sweep_normalization"]

DEFAULT_MODALITIES: tuple[str, ...] = ("audio", "vision")
EPS = 1e-6  # added to the std, as in the authors' procedure
STATS_SPLIT = "train"
SETTING = "normalize_features"
logger = logging.getLogger("MMSA")


@dataclass(frozen=True)
class NormalizationReport:
    """What ``normalize_features`` did."""

    path: str
    modalities: tuple[str, ...]
    samples: dict[str, int]  # per split
    features: dict[str, int]  # per modality: features normalized
    stats_frames: dict[str, int]  # per modality: valid train frames the statistics came from
    constant: dict[str, list[int]]  # per modality: features with train std 0

    def summary(self) -> str:
        """One line for logs."""
        parts = ", ".join(f"{m} ({self.features[m]} features, statistics over {self.stats_frames[m]} frames)"
                          for m in self.modalities)
        return (f"normalize_features: {parts} of '{self.path}' standardised with the mean and std of the valid "
                f"frames of its '{STATS_SPLIT}' split; samples per split: "
                + ", ".join(f"{s} {n}" for s, n in self.samples.items()))


def _error(path: str, what: str, split: str | None = None, key: str | None = None) -> FeatureFileError:
    where = f"feature file '{path}'" + (f", split '{split}'" if split else "") + (f", key '{key}'" if key else "")
    return FeatureFileError(f"{where}: {what}", path=path or None, split=split, key=key)


def _valid_frames(split: Mapping[str, Any], key: str, values: np.ndarray, *, path: str, name: str) -> np.ndarray:
    """(N, T) bool: True where frame t of sample n is valid (t < its length)."""
    length_key = f"{key}_lengths"
    if length_key not in split:
        raise _error(path, f"has no '{length_key}': normalization needs the valid frame count of every sample "
                           "(unaligned features)", name, length_key)
    lengths = np.asarray(split[length_key])
    if lengths.ndim != 1 or lengths.shape[0] != values.shape[0]:
        raise _error(path, f"has shape {lengths.shape}, expected ({values.shape[0]},) like '{key}'", name,
                     length_key)
    if lengths.dtype.kind == "f":
        bad = ~np.isfinite(lengths) | (lengths != np.floor(lengths))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _error(path, f"lengths must be integers; sample {i} has {lengths[i]!r}", name, length_key)
    elif lengths.dtype.kind not in "iub":
        raise _error(path, f"has dtype {lengths.dtype}, expected integers", name, length_key)
    steps = values.shape[1]
    bad = (lengths < 0) | (lengths > steps)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _error(path, f"sample {i} has length {lengths[i].item()}, outside [0, {steps}] ('{key}' has "
                           f"shape {values.shape})", name, length_key)
    return np.arange(steps)[None, :] < lengths.astype(np.int64)[:, None]


def _features(split: Mapping[str, Any], key: str, *, path: str, name: str) -> np.ndarray:
    if key not in split:
        raise _error(path, f"has no '{key}'", name, key)
    values = split[key]
    if not isinstance(values, np.ndarray) or values.ndim != 3 or values.dtype.kind != "f":
        what = f"{type(values).__name__}" + (f" of dtype {values.dtype}, shape {values.shape}"
                                             if isinstance(values, np.ndarray) else "")
        raise _error(path, f"is a {what}; normalization needs a float array (N, frames, features)", name, key)
    return values


def _require_finite(frames: np.ndarray, mask: np.ndarray, *, path: str, name: str, key: str) -> None:
    finite = np.isfinite(frames)
    if not finite.all():
        sample = int(np.nonzero(mask)[0][int(np.flatnonzero(~finite.all(axis=1))[0])])
        raise _error(path, f"{int(finite.size - finite.sum())} NaN/inf value(s) in valid frames, first in sample "
                           f"{sample}: train statistics over them would be NaN/inf for every value of the feature; "
                           f"replace them in the file or set {SETTING}=false", name, key)


def normalize_features(data: Mapping[str, Any], modalities: Sequence[str] = DEFAULT_MODALITIES, *,
                       path: str | os.PathLike[str] = "") -> tuple[dict[str, Any], NormalizationReport]:
    """The content of an MMSA feature file with ``modalities`` standardised by train statistics (module
    docstring); ``data`` is not changed: splits are new dicts, normalized keys new arrays, all else shared."""
    path = str(path)
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in DEFAULT_MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"modalities {list(modalities)}: choose among {list(DEFAULT_MODALITIES)} (text holds token "
                         "ids and is never normalized)")
    if not isinstance(data, Mapping):
        raise _error(path, f"top level is a {type(data).__name__}, expected a dict with splits {list(SPLITS)}")
    missing = [s for s in SPLITS if not isinstance(data.get(s), Mapping)]
    if missing:
        raise _error(path, f"needs the splits {list(SPLITS)} as dicts; missing or not a dict: {missing}", missing[0])
    out: dict[str, Any] = dict(data)
    for name in SPLITS:
        out[name] = dict(data[name])
    features, frames_used, constant = {}, {}, {}
    for key in modalities:
        train = _features(data[STATS_SPLIT], key, path=path, name=STATS_SPLIT)
        mask = _valid_frames(data[STATS_SPLIT], key, train, path=path, name=STATS_SPLIT)
        packed = train[mask]  # (valid frames, features), sample by sample as the authors concatenate them
        if packed.shape[0] == 0:
            raise _error(path, "has no valid frame (every length is 0): no statistics to normalize with",
                         STATS_SPLIT, key)
        _require_finite(packed, mask, path=path, name=STATS_SPLIT, key=key)
        mean, std = np.mean(packed, axis=0), np.std(packed, axis=0)
        scale = std + EPS
        zero = np.flatnonzero(std == 0)
        features[key], frames_used[key], constant[key] = train.shape[2], int(packed.shape[0]), zero.tolist()
        for name in SPLITS:
            values = _features(data[name], key, path=path, name=name)
            if values.shape[2] != train.shape[2]:
                raise _error(path, f"has {values.shape[2]} features, '{STATS_SPLIT}' has {train.shape[2]}", name, key)
            valid = mask if name == STATS_SPLIT else _valid_frames(data[name], key, values, path=path, name=name)
            frames = packed if name == STATS_SPLIT else values[valid]
            _require_finite(frames, valid, path=path, name=name, key=key)
            normalized = values.copy()
            normalized[valid] = (frames - mean) / scale
            out[name][key] = normalized
            if zero.size and frames.shape[0]:
                moved = np.abs(frames[:, zero] - mean[zero]).max(axis=0) > 0
                if moved.any():
                    warnings.warn(f"{path}: feature(s) {zero[moved].tolist()[:10]} of '{key}' are constant over the "
                                  f"'{STATS_SPLIT}' split (std 0) but not in '{name}': divided by {EPS:g} as in the "
                                  f"authors' procedure, their values there reach "
                                  f"{float(np.abs(normalized[valid][:, zero]).max()):.3g}", stacklevel=2)
    report = NormalizationReport(path=path, modalities=modalities,
                                 samples={s: int(np.asarray(out[s][modalities[0]]).shape[0]) for s in SPLITS},
                                 features=features, stats_frames=frames_used, constant=constant)
    return out, report


def _write_atomically(content: Any, target: Path) -> None:
    """Pickles ``content`` to a temporary file beside ``target``, then renames it: a reader never sees a partial
    file, and two writers of the same content leave one whole file."""
    with atomic_file(target, "wb") as f:
        pickle.dump(content, f, protocol=4)


def normalize_file(source: str | os.PathLike[str], target: str | os.PathLike[str],
                   modalities: Sequence[str] = DEFAULT_MODALITIES, *, overwrite: bool = False) -> NormalizationReport:
    """Writes the normalized copy of feature file ``source`` to ``target`` (same keys and dtypes). Refuses to
    write over ``source`` and, unless ``overwrite``, over an existing ``target``."""
    source, target = Path(source), Path(target)
    if target.resolve() == source.resolve() or (target.exists() and source.exists()
                                                 and os.path.samefile(source, target)):
        raise FileExistsError(f"--out '{target}' is the input file: write the normalized copy to another path")
    if target.exists() and not overwrite:
        raise FileExistsError(f"'{target}' exists; pass --overwrite to replace it")
    normalized, report = normalize_features(load_feature_file(source), modalities, path=source)
    _write_atomically(normalized, target)
    return report


def normalized_file(source: str | os.PathLike[str], cache_dir: str | os.PathLike[str],
                    modalities: Sequence[str] = DEFAULT_MODALITIES) -> Path:
    """A normalized copy of ``source`` in ``cache_dir``, written once per source content (keyed by its path, size
    and modification time) and reused by every model and rate of a sweep."""
    source = Path(source)
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{list(modalities)}".encode())
    target = Path(cache_dir) / f"{source.stem}-normalized-{key.hexdigest()[:12]}.pkl"
    if target.exists():
        logger.info(f"normalize_features: reusing {target}, the normalized copy of '{source}'")
        return target
    normalized, report = normalize_features(load_feature_file(source), modalities, path=source)
    _write_atomically(normalized, target)
    logger.info(f"{report.summary()}; written to {target}")
    return target


def normalize_setting(args: Mapping[str, Any]) -> bool:
    """The ``normalize_features`` setting of a run (absent: false); anything but a bool is an error."""
    value = args.get(SETTING, False)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"config key '{SETTING}' is {value!r} for model '{args.get('model_name')}' (config file "
                         f"{args.get('config_file', '?')}): use true or false")
    return bool(value)


def sweep_normalization(dataset: str, config_file: str | os.PathLike[str],
                        overrides: Mapping[str, Any] | None = None) -> bool:
    """The input every model of a robustness sweep gets: ``normalize_features`` from the sweep's overrides, else
    EMT-DLFR's config entry for ``dataset`` (false when the config has none)."""
    if overrides and SETTING in overrides:
        return normalize_setting({**overrides, "model_name": "every model of the sweep"})
    raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
    if dataset not in raw.get("emt-dlfr", {}).get("datasetParams", {}):
        return False
    from .mmsa.config import load_config  # here: mmsa.data imports this module

    return normalize_setting(load_config("emt-dlfr", dataset, config_file))
