"""mmsa-emt's own config entries, merged at load time into the installed MMSA's complete config.

The package ships only what is ours, in MMSA's layout (``config_regression.json``: the ``emt-dlfr`` entry and the
``avec2019`` dataset under ``datasetCommonParams``; ``config_tune.json``: the sections the tuning entry adds, the
search space ``debugParams``). ``merged_config`` puts them into MMSA's ``config_regression.json`` /
``config_tune.json``, so no copy of MMSA's entries is kept here and every MMSA model reads MMSA's own values.

MMSA's readers, the robustness sweep and the results (``config_file``) all take a path, so ``merged_config_file``
writes the merged dict to a per-user cache file named by a hash of its content: the path recorded with a result
always names exactly the config it ran with (another content gets another name, nothing is rewritten in place),
and processes writing it at the same time write the same bytes through an atomic rename.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import write_text

KINDS = ("regression", "tune")
ROOT_DATASET_DIR = "../dataset"  # dataset_root_dir of the repository's config/ copies: relative to the file
CACHE_ENV = "MMSA_EMT_CACHE_DIR"


class ConfigMergeError(RuntimeError):
    """The installed MMSA's config cannot take mmsa-emt's entries (missing what they need, or clashing)."""


def _kind(tune: bool) -> str:
    return "tune" if tune else "regression"


def _read_json(source: Any, what: str) -> dict[str, Any]:
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigMergeError(f"cannot read {what} ({source}): {error}") from error
    if not isinstance(data, dict):
        raise ConfigMergeError(f"{what} ({source}) is not a JSON object")
    return data


def mmsa_config_file(tune: bool = False) -> Path:
    """The installed MMSA's own complete config (``MMSA/config/config_{regression,tune}.json``)."""
    return Path(str(resources.files("MMSA") / "config" / f"config_{_kind(tune)}.json"))


def ours(tune: bool = False) -> dict[str, Any]:
    """mmsa-emt's entries in MMSA's layout: the regression part, plus the tuning sections when ``tune``."""
    package = resources.files(__name__)
    entries = _read_json(package / "config_regression.json", "mmsa-emt's packaged regression entries")
    if tune:
        extra = _read_json(package / "config_tune.json", "mmsa-emt's packaged tuning entries")
        for model, sections in extra.items():
            entries[model] = {**entries.get(model, {}), **sections}
    return entries


def merged_config(tune: bool = False, *, mmsa_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """MMSA's complete config with ours merged in: ``datasetCommonParams`` gains our datasets after MMSA's, and
    our models come right after it, before MMSA's (the order of the repository's ``config/`` files).

    Refuses (``ConfigMergeError``) when MMSA's file lacks ``datasetCommonParams``/``dataset_root_dir`` or a dataset
    our entries have parameters for, or when it already has an entry of ours (a merge would silently pick one)."""
    source = Path(mmsa_file) if mmsa_file is not None else mmsa_config_file(tune)
    theirs = _read_json(source, "MMSA's config")
    mine = ours(tune)
    datasets = theirs.get("datasetCommonParams")
    if not isinstance(datasets, dict) or "dataset_root_dir" not in datasets:
        raise ConfigMergeError(f"MMSA's config {source} has no datasetCommonParams.dataset_root_dir: mmsa-emt "
                               "merges its entries into MMSA 2.2.1's layout; pass a complete config_file instead")
    my_datasets = mine.get("datasetCommonParams", {})
    clashes = sorted({*my_datasets} & {*datasets}) + sorted(
        f"model '{name}'" for name in mine if name != "datasetCommonParams" and name in theirs)
    if clashes:
        raise ConfigMergeError(f"MMSA's config {source} already has {', '.join(clashes)}, which mmsa-emt ships: "
                               "this installed MMSA is not the 2.2.1 mmsa-emt was made for")
    known = {*datasets, *my_datasets} - {"dataset_root_dir"}
    for name, entry in mine.items():
        missing = sorted(set(entry.get("datasetParams", {})) - known) if name != "datasetCommonParams" else []
        if missing:
            raise ConfigMergeError(f"MMSA's config {source} has no datasetCommonParams entry for "
                                   f"{', '.join(missing)}, which mmsa-emt's '{name}' entry has parameters for")
    merged: dict[str, Any] = {"datasetCommonParams": {**datasets, **copy.deepcopy(my_datasets)}}
    merged.update((name, entry) for name, entry in mine.items() if name != "datasetCommonParams")
    merged.update((name, entry) for name, entry in theirs.items() if name != "datasetCommonParams")
    return merged


def render(config: Mapping[str, Any]) -> str:
    """The text of a config file, as the repository's ``config/`` files are written."""
    return json.dumps(config, indent=2)


def cache_dir() -> Path:
    """``$MMSA_EMT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmsa_emt``, else ``~/.cache/mmsa_emt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mmsa_emt"


def merged_config_file(tune: bool = False) -> Path:
    """The merged config as a file: ``<cache_dir>/config_{regression,tune}-<sha256 prefix>.json``, written once
    (atomically) and rewritten only if that file's content is not what its name says."""
    text = render(merged_config(tune))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    folder = cache_dir()
    path = folder / f"config_{_kind(tune)}-{digest}.json"
    try:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
    except OSError as error:
        raise OSError(f"cannot write mmsa-emt's merged config to {folder} ({error}): set {CACHE_ENV} to a "
                      "writable folder, or pass a complete config_file") from error
    return path


def is_mmsa_default(config_file: str | os.PathLike[str] | None, tune: bool = False) -> bool:
    """True for the path ``MMSA_run`` substitutes when it is given no config file (MMSA's own default)."""
    if config_file is None or not str(config_file):
        return False
    return Path(config_file).resolve() == mmsa_config_file(tune).resolve()


def repository_configs(dataset_root_dir: str = ROOT_DATASET_DIR) -> dict[str, str]:
    """File name -> text of the complete configs the repository keeps in ``config/`` (``write_configs``)."""
    files = {}
    for kind in KINDS:
        config = merged_config(kind == "tune")
        config["datasetCommonParams"]["dataset_root_dir"] = dataset_root_dir
        files[f"config_{kind}.json"] = render(config)
    return files


def write_configs(out: str | os.PathLike[str], *, dataset_root_dir: str = ROOT_DATASET_DIR,
                  overwrite: bool = False) -> dict[Path, str]:
    """Writes the complete ``config_regression.json`` and ``config_tune.json`` (MMSA's entries and ours) into
    ``out``; returns path -> 'written' | 'unchanged'. A file there with other content is kept (``FileExistsError``
    naming it) unless ``overwrite``: it may hold a user's edits. Nothing is written unless every file may be."""
    folder = Path(out)
    files = {folder / name: text for name, text in repository_configs(dataset_root_dir).items()}
    status = {path: "unchanged" if path.is_file() and path.read_text(encoding="utf-8") == text else "written"
              for path, text in files.items()}
    kept = [str(path) for path, state in status.items() if state == "written" and path.exists()]
    if kept and not overwrite:
        raise FileExistsError(f"{', '.join(kept)} exist(s) with other content (your edits?): pass --overwrite "
                              "to replace them, or write elsewhere with --out")
    for path, text in files.items():
        if status[path] == "written":
            write_text(path, text)
    return status


__all__ = ["ConfigMergeError", "cache_dir", "is_mmsa_default", "merged_config", "merged_config_file",
           "mmsa_config_file", "ours", "repository_configs", "write_configs"]
