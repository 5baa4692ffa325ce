"""What tells configurations apart in the results: ``config_hash``, over a model's config values and the content
digest of its feature file (``file_digest``, cached by path, size and modification time)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..mmsa.config import feature_file, load_config

VOLATILE_ARGS = {"config_file", "feature_hint", "model_save_path", "device", "missing_rate", "cur_seed",
                 "custom_feature", "feature_T", "feature_A", "feature_V", "train_mode"}
DIGEST_CACHE = ".feature_digests.json"  # in the out folder: content digests of feature files, by path/size/mtime
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
            write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True) + "\n")
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


def config_hash(model: str, dataset: str, config_file: str | Path, overrides: dict | None = None, *,
                digest_cache: str | Path | None = None) -> str:
    """Hash of everything that shapes a trial except its rates and seed: the config values (feature path included)
    and the feature file's content digest (``file_digest``, cached in ``digest_cache``)."""
    args = load_config(model, dataset, config_file)
    args.update(overrides or {})
    kept = {k: v for k, v in args.items() if k not in VOLATILE_ARGS}
    feature = feature_file(args)
    kept["feature_file"] = [str(feature), file_digest(feature, digest_cache) if feature.is_file() else None]
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
