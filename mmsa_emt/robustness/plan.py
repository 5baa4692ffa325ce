"""A sweep's settings, checked before anything is trained (``check_settings``, whose errors name the option), and
its trials (``TrialSpec``, ``plan_trials``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Rates = tuple[float, float, float]
DEFAULT_SEEDS = (111, 1111, 11111)
PROTOCOLS = ("per-rate", "train-once")
OPTIONS = {"rates": "--rates/rates", "modality_rates": "--modality-rates/modality_rates",
           "train_rate": "--train-rate/train_rate", "seeds": "--seeds/seeds", "protocol": "--protocol/protocol"}


def default_rates(dataset: str) -> list[float]:
    """The paper's sweep: 0.0..1.0 by 0.1 for MOSI/MOSEI, 0.0..0.5 for SIMS."""
    top = 0.5 if dataset == "sims" else 1.0
    return [round(r, 1) for r in np.arange(0.0, top + 1e-9, 0.1)]


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
