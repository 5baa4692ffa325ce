"""Random feature missing on MMSA feature files, exactly as MMSA's ``data_missing`` draws it.

MMSA's loader (``MMDataset.generate_m``) drops each valid text token, audio frame and vision frame independently
with probability ``rate``, from a per-modality numpy seed; [CLS] and [SEP] are always kept; dropped tokens become
[UNK] (id 100) and dropped frames become zeros. EMT-DLFR and TFR-Net read that incomplete view from the loader;
models that are not missing-aware get it through a derived feature file written here, in which the same masks
are applied to ``text_bert`` (ids -> [UNK]), ``text`` (token features -> zeros), ``audio`` and ``vision``.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_file

UNK_ID = 100
MODALITY_KEYS = ("text", "audio", "vision")


def keep_mask(valid: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """1 where a valid step survives: MMSA's draw, ``uniform(size=valid.shape) > rate`` after ``seed``."""
    np.random.seed(seed)  # MMSA seeds the global generator; the same call keeps the masks identical
    return (np.random.uniform(size=valid.shape) > rate) * valid


def text_keep_mask(attention: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Keep mask over BERT tokens with [CLS] (first) and [SEP] (last valid token) always kept."""
    keep = keep_mask(attention, rate, seed)
    lengths = np.argmin(attention, axis=1)  # first padding position; 0 for a full row, so [SEP] is at -1
    keep[:, 0] = 1
    keep[np.arange(len(keep)), lengths - 1] = 1
    return keep


def frame_mask(lengths: Sequence[int], steps: int) -> np.ndarray:
    return (np.arange(steps)[None] < np.asarray(lengths, dtype=np.int64)[:, None]).astype(np.int64)


def drop_split(split: dict[str, Any], rates: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """One split of an MMSA feature dict with the incomplete view in place of the complete one."""
    out = dict(split)
    text_bert = np.asarray(split["text_bert"], dtype=np.float32)
    attention = text_bert[:, 1]
    keep = text_keep_mask(attention, rates[0], seeds[0])
    ids = text_bert[:, 0] * keep + UNK_ID * (attention - keep)
    out["text_bert"] = np.concatenate([ids[:, None], text_bert[:, 1:]], axis=1).astype(np.float32)
    if "text" in split:  # token features of non-BERT models, aligned with the BERT tokens
        text = np.asarray(split["text"], dtype=np.float32)
        out["text"] = (text * keep[:, : text.shape[1], None]).astype(np.float32)
    for key, rate, seed in zip(MODALITY_KEYS[1:], rates[1:], seeds[1:]):
        values = np.asarray(split[key], dtype=np.float32)
        valid = frame_mask(split[f"{key}_lengths"], values.shape[1])
        out[key] = (values * keep_mask(valid, rate, seed)[..., None]).astype(np.float32)
    return out


def drop_features(data: dict[str, dict], rates: Sequence[float], seeds: Sequence[int]) -> dict[str, dict]:
    """All splits of an MMSA feature dict, each with MMSA's incomplete view (same masks per split as MMSA)."""
    return {name: drop_split(split, rates, seeds) for name, split in data.items()}


def incomplete_view_file(source: str | Path, rates: Sequence[float], seeds: Sequence[int],
                         cache_dir: str | Path) -> Path:
    """Writes (once) and returns a feature file holding the incomplete view of ``source`` at ``rates``."""
    source = Path(source)
    stat = source.stat()
    # the modification time too: a source rewritten with the same size (e.g. corrected labels) gets a new file
    stamp = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{list(rates)}|{list(seeds)}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    rate_tag = "-".join(f"{r:g}" for r in rates)
    target = Path(cache_dir) / f"{source.stem}-missing{rate_tag}-{key}.pkl"
    if not target.exists():
        with open(source, "rb") as f:
            data = pickle.load(f)
        # processes writing the same file at once never write into one another's bytes (``atomic_file``)
        with atomic_file(target, "wb") as f:
            pickle.dump(drop_features(data, rates, seeds), f, protocol=4)
    return target
