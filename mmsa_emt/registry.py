"""Models by name: every list of names (MMSA hooks, CLI choices, docs) is computed from this one registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])
_MODELS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register_model(name: str, *aliases: str) -> Callable[[Builder], Builder]:
    """Decorator: registers a builder under a lower-case ``name`` and its aliases (matched case-insensitively)."""

    def decorate(builder: Builder) -> Builder:
        _MODELS[name.lower()] = builder
        for alias in (name, *aliases):
            _ALIASES[alias.lower()] = name.lower()
        return builder

    return decorate


def canonical_name(name: str) -> str | None:
    """'EMT-DLFR', 'emt_dlfr' -> 'emt-dlfr'; None for a name not registered here."""
    return _ALIASES.get(name.lower())


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_builder(name: str) -> Callable[..., nn.Module]:
    key = canonical_name(name)
    if key is None:
        raise KeyError(f"unknown model '{name}'; registered models: {', '.join(list_models())}")
    return _MODELS[key]
