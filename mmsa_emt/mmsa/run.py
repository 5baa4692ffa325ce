"""MMSA's run helpers, for the code outside this package: ``run_mmsa`` (``MMSA_run``), ``seed_everything`` (the
seeding of MMSA's ``_run``) and ``dict_to_str`` (how MMSA prints results)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import MMSA
from MMSA.utils import dict_to_str as _mmsa_dict_to_str
from MMSA.utils import setup_seed


def run_mmsa(model_name: str, dataset_name: str, **options: Any) -> Any:
    """``MMSA_run`` with mmsa-emt's models registered; ``options`` are ``MMSA_run``'s keywords, MMSA's defaults
    for the others."""
    return MMSA.MMSA_run(model_name, dataset_name, **options)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch and makes cuDNN deterministic, as MMSA's ``_run`` does before each run."""
    setup_seed(seed)


def dict_to_str(results: Mapping[str, float]) -> str:
    """Results as MMSA prints and logs them (' MAE: 0.7123  Corr: 0.5012 ')."""
    return _mmsa_dict_to_str(results)
