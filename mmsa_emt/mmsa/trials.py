"""Missing-rate trials for ``mmsa_emt.robustness``: one model trained at given missing rates and tested at others,
as MMSA's ``_run`` does; ``trial_args`` builds and checks the args ``MMSA_run`` would build for one run."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import MMSA.run as mmsa_run
import torch
from easydict import EasyDict
from MMSA.utils import setup_seed
from torch.utils.data import DataLoader

from .. import settings
from ..missing import incomplete_view_file
from ..normalize import normalize_setting, normalized_file
from ..registry import canonical_name
from .config import _set_device_if_cuda, load_config
from .config import is_ours as _is_ours
from .data import DEFAULT_MISSING_SEEDS, checked_data_loader, checked_test_loaders
from .models import AMIO, ATIO
from .trainer import _plain

NATIVE_MISSING = ("tfr_net",)  # MMSA's own missing-aware model: it reads MMSA's incomplete view itself


def display_name(model_name: str) -> str:
    """'emt_dlfr' -> 'EMT-DLFR', 'self_mm' -> 'Self_MM': the spelling of MMSA's model list."""
    key = canonical_name(model_name)
    if key is not None:
        return key.upper()
    known = {m.lower(): m for m in [*mmsa_run.SUPPORTED_MODELS, "TFR_Net"]}
    return known.get(model_name.lower(), model_name)


def reads_incomplete_view(model_name: str) -> bool:
    """True for models that take MMSA's data_missing view natively (ours, TFR-Net); the others are fed a derived
    feature file holding only the incomplete view (see ``mmsa_emt.missing``)."""
    return canonical_name(model_name) is not None or model_name.lower() in NATIVE_MISSING


def _at_missing_rates(args: EasyDict, rates: Sequence[float], cache_dir: Path) -> EasyDict:
    """A copy of ``args`` whose data is missing at ``rates`` (text, audio, vision)."""
    at = EasyDict(copy.deepcopy(dict(args)))
    seeds = [int(s) for s in (args.get("missing_seed") or DEFAULT_MISSING_SEEDS)]
    if reads_incomplete_view(at["model_name"]):
        at.update(data_missing=True, missing_rate=[float(r) for r in rates], missing_seed=seeds)
    else:
        source = args["featurePath"]
        if normalize_setting(args):  # normalize first, then drop, as the loader does for the other models
            source = normalized_file(source, cache_dir)
            at["normalize_features"] = False  # the derived file is normalized already
        at["featurePath"] = str(incomplete_view_file(source, rates, seeds, cache_dir))
        at["data_missing"] = False
    return at


def trial_args(model_name: str, dataset_name: str, config_file: str | os.PathLike, *,
               overrides: Mapping[str, Any] | None = None, gpu_ids: Sequence[int] = ()) -> EasyDict:
    """The args ``MMSA_run`` would build for one run, plus ``overrides``."""
    args = load_config(model_name, dataset_name, config_file)
    args.update(dict(overrides or {}))
    args.update(device=settings.checked_assign_gpu(gpu_ids), train_mode="regression", custom_feature=None,
                feature_T=None, feature_A=None, feature_V=None, cur_seed=1)
    check_args(args)
    return args


def check_args(args: EasyDict) -> None:
    """Every setting checked before the first batch: ``settings.check_args`` for ours (every key) or MMSA's
    models (the keys all its trainers share)."""
    settings.check_args(args, ours=_is_ours(args))


def _settings_checked_loader(args: EasyDict, num_workers: int = 4) -> dict[str, DataLoader]:
    """``checked_data_loader`` after ``check_args``: MMSA's ``_run`` calls its loader first, once per seed (or
    tuning trial), with the args merged from the config file and ``config=``, before any data is read or any model
    built."""
    check_args(args)
    return checked_data_loader(args, num_workers)


def run_missing_trial(args: EasyDict, *, seed: int, train_rates: Sequence[float],
                      test_rates: Sequence[Sequence[float]], checkpoint: Path, cache_dir: Path,
                      num_workers: int = 0) -> tuple[list[dict[str, float]], Path]:
    """Trains one model at ``train_rates`` with ``seed`` and tests it at each of ``test_rates``, as MMSA's
    ``_run`` does (seeding, loaders, AMIO, ATIO); returns the test results and the checkpoint written."""
    train_args = _at_missing_rates(args, train_rates, cache_dir)
    train_args["model_save_path"] = checkpoint
    checkpoint.parent.mkdir(parents=True, exist_ok=True)  # MMSA's own trainers save without creating it
    _set_device_if_cuda(train_args["device"])
    setup_seed(seed)
    loaders = checked_data_loader(train_args, num_workers)
    model = AMIO(train_args).to(train_args["device"])
    trainer = ATIO().getTrain(train_args)
    trainer.do_train(model, loaders)
    saved = Path(train_args["model_save_path"])  # our trainer picks a per-seed name that overwrites nothing
    model.load_state_dict(torch.load(saved, map_location="cpu"))
    trained_at = loaders["test"]
    del loaders  # the training and validation splits are not needed for testing

    def same(rates: Sequence[float]) -> bool:
        return [float(r) for r in rates] == [float(r) for r in train_rates]

    # the other test rates' loaders, one at a time; for our models they share one read of the feature file
    others = checked_test_loaders((_at_missing_rates(args, rates, cache_dir) for rates in test_rates
                                   if not same(rates)), num_workers)
    results = []
    for rates in test_rates:
        loader = trained_at if same(rates) else next(others)
        results.append(_plain({k: v for k, v in trainer.do_test(model, loader, mode="TEST").items()
                               if isinstance(v, (int, float))}))
    return results, saved
