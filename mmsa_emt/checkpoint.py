"""Weights that carry their config: the checkpoint format of mmsa-emt, and ``from_pretrained``.

A checkpoint written by mmsa-emt's trainer is one ``torch.save``'d dict of plain data (it loads with
``torch.load(weights_only=True)``)::

    {"format": "mmsa-emt-checkpoint", "version": 1, "model_name": "emt-dlfr",
     "config": {...EMTDLFRConfig fields, the text encoder's name or folder in "pretrained"...},
     "encoder_config": {...the text encoder's transformers config...} or None (no text modality),
     "settings": {...the run's EMT-DLFR settings: missing data, speed, training...},
     "prefix": "Model.", "state_dict": {"Model.net.text_encoder...": tensor, ...}}

The network is rebuilt from ``config`` and ``encoder_config`` alone (nothing downloaded) and the weights are loaded
into it; ``settings`` lets ``mmsa-emt test`` evaluate as the run did (missing seeds, feature normalization).
Weight-only files (a plain state dict, as MMSA saves its models) still load when a config is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .dlfr import DLFR, upgrade_state_dict
from .model import EMTDLFRConfig

FORMAT = "mmsa-emt-checkpoint"
VERSION = 1
MMSA_PREFIX = "Model."  # MMSA's AMIO holds the model under 'Model'
RUN_GROUPS = ("model", "optimizer", "loss", "training", "missing data", "speed and memory")  # settings.SETTINGS


class CheckpointError(ValueError):
    """A weights file that cannot be, or must not be, loaded into the model asked for."""


def load_file(f: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` whose errors name the file: an empty file (a name reserved by a run that ended before its
    first checkpoint), a truncated file, or one that is no PyTorch checkpoint at all (torch's own message for the
    last would suggest ``weights_only=False``, i.e. running arbitrary pickled code)."""
    name = str(getattr(f, "name", f))
    if isinstance(f, (str, os.PathLike)) and Path(f).is_file() and Path(f).stat().st_size == 0:
        raise CheckpointError(f"{name} is empty: a checkpoint name reserved by a run that ended before writing its "
                              "weights (see docs/mmsa.md); delete it")
    try:
        return torch.load(f, *args, **kwargs)
    except OSError:
        raise  # names the file already (not found, no permission)
    except Exception as error:  # torch.load raises RuntimeError, EOFError, KeyError, UnpicklingError, ... here
        if "Unsupported global" in str(error):  # a pickle that names classes: torch's weights-only load refuses it
            why = ("it holds Python objects other than tensors (a whole pickled model, or not a state dict); "
                   "only weights saved with torch.save(model.state_dict(), path) are loaded")
        else:
            why = f"it is not a (complete) PyTorch checkpoint, perhaps truncated ({type(error).__name__})"
        raise CheckpointError(f"cannot load {name}: {why}") from error


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: nn.Module, state: Any, source: str = "the state dict") -> Any:
    """Loads ``state`` into ``model`` strictly: an EMT-DLFR checkpoint must hold exactly the model's keys and
    shapes. MMSA_test asks for ``strict=False``, under which a checkpoint of another model or layout would predict
    with the untouched random weights of every key it lacks."""
    state = state_dict_of(state, source)  # a checkpoint that carries its config: its weights
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    state = upgrade_state_dict(dict(state), "Model." if hasattr(model, "Model") else "")  # the earlier layout
    expected, given = set(nn.Module.state_dict(model)), set(state)
    missing, unexpected = expected - given, given - expected
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys ({_few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({_few(unexpected)})" if unexpected else ""]
        hint = (" (its keys lack the 'Model.' prefix of MMSA's AMIO)"
                if unexpected and {f"Model.{k}" for k in unexpected} >= missing else "")
        inner = getattr(model, "Model", model)
        name = "EMT-DLFR" if isinstance(inner, DLFR) else type(inner).__name__
        raise CheckpointError(f"{source} does not fit this {name} model: {' and '.join(p for p in parts if p)}"
                              f"{hint}; it was saved from another model or configuration")
    try:
        return nn.Module.load_state_dict(model, state, strict=True)
    except RuntimeError as error:  # shapes differ: another configuration (widths, feature dimensions)
        raise CheckpointError(f"{source} does not fit this model's configuration: {error}") from error


def is_packaged(saved: Any) -> bool:
    """True for a checkpoint in this module's format (weights with their config)."""
    return isinstance(saved, Mapping) and saved.get("format") == FORMAT


def state_dict_of(saved: Any, source: str = "the checkpoint") -> Any:
    """The state dict of a packaged checkpoint (keys as saved, e.g. 'Model.'-prefixed); anything else is returned
    as it is (a weight-only file is its state dict)."""
    if not is_packaged(saved):
        return saved
    version = saved.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{source} is an mmsa-emt checkpoint of format version {version!r}; this mmsa-emt "
                              f"reads versions up to {VERSION}: upgrade mmsa-emt")
    return saved["state_dict"]


def _plain(value: Any, what: str = "a value") -> Any:
    """``value`` as JSON-like plain data (tuples become lists, numpy numbers Python ones): what
    ``torch.load(weights_only=True)`` reads back."""

    def convert(item: Any) -> Any:
        if hasattr(item, "tolist"):  # numpy scalars and arrays
            return item.tolist()
        raise TypeError(f"{what} holds a {type(item).__name__}, which a checkpoint cannot store as plain data")

    return json.loads(json.dumps(value, default=convert))


def run_settings(args: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``args`` (MMSA's args) that belong to the trained model and how it was run (the groups
    ``RUN_GROUPS`` of ``settings.SETTINGS``), not where its data lay or which device ran it."""
    from .settings import SETTINGS

    return {key: _plain(value, f"setting '{key}'") for key, value in args.items()
            if key in SETTINGS and SETTINGS[key].group in RUN_GROUPS}


def encoder_config_of(model: nn.Module) -> dict[str, Any] | None:
    """The transformers config of the model's text encoder as plain data; None without a text encoder."""
    net = getattr(model, "net", model)
    encoder = getattr(net, "text_encoder", None)
    if encoder is None:
        return None
    return json.loads(encoder.bert.config.to_json_string(use_diff=False))


def package(state_dict: Mapping[str, Tensor], *, config: EMTDLFRConfig, encoder_config: Mapping[str, Any] | None,
            settings: Mapping[str, Any] | None = None, model_name: str = "emt-dlfr",
            prefix: str = "") -> dict[str, Any]:
    """The dict ``torch.save`` writes: the weights with the model config (module docstring)."""
    values = dataclasses.asdict(config)
    values.pop("encoder_config")
    return {"format": FORMAT, "version": VERSION, "model_name": model_name, "config": _plain(values, "the config"),
            "encoder_config": None if encoder_config is None else _plain(dict(encoder_config), "the encoder config"),
            "settings": _plain(dict(settings or {}), "the settings"), "prefix": prefix, "state_dict": dict(state_dict)}


def metadata(model: nn.Module, args: Mapping[str, Any], *, prefix: str = MMSA_PREFIX) -> dict[str, Any]:
    """``package``'s arguments other than the weights, for ``model`` (a ``DLFR``) trained with MMSA's ``args``."""
    return {"config": model.config, "encoder_config": encoder_config_of(model), "settings": run_settings(args),
            "model_name": str(args.get("model_name", "emt-dlfr")), "prefix": prefix}


@dataclass
class Checkpoint:
    """A checkpoint read back: the state dict without its prefix, and the config where the file carries one."""

    source: str
    state_dict: dict[str, Tensor]
    config: EMTDLFRConfig | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None

    @property
    def packaged(self) -> bool:
        return self.config is not None


def read(path: str | os.PathLike, *, map_location: Any = "cpu") -> Checkpoint:
    """Reads ``path`` (weights-only load): a packaged checkpoint with its config, or a weight-only state dict
    (``config`` None). A common 'Model.' prefix (MMSA's AMIO) is removed from the keys."""
    return from_saved(load_file(path, map_location=map_location, weights_only=True), str(path))


def from_saved(saved: Any, source: str) -> Checkpoint:
    """``read`` for what ``torch.load`` returned from the file ``source``."""
    state = state_dict_of(saved, source)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    prefix = saved.get("prefix", "") if is_packaged(saved) else ""
    if not prefix and state and all(k.startswith(MMSA_PREFIX) for k in state):
        prefix = MMSA_PREFIX
    state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in state.items()}
    if not is_packaged(saved):
        return Checkpoint(source=source, state_dict=state)
    values = dict(saved["config"])
    unknown = set(values) - {f.name for f in dataclasses.fields(EMTDLFRConfig)}
    if unknown:
        raise CheckpointError(f"{source}: its config has keys this mmsa-emt does not know ({', '.join(sorted(unknown))}"
                              "); it was written by a newer mmsa-emt")
    values["modalities"] = tuple(values.get("modalities", ()))
    config = EMTDLFRConfig(**values, encoder_config=saved.get("encoder_config"))
    return Checkpoint(source=source, state_dict=state, config=config, settings=dict(saved.get("settings") or {}),
                      model_name=saved.get("model_name"))


def load_into(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Loads the checkpoint's weights into ``model`` strictly (``load_weights``: keys and shapes must match, the
    earlier key layout is mapped)."""
    load_weights(model, checkpoint.state_dict, source=checkpoint.source)


def build(checkpoint: Checkpoint, config: EMTDLFRConfig | None = None) -> nn.Module:
    """The EMT-DLFR model (``DLFR``, in eval mode) of ``checkpoint`` with its weights loaded; ``config`` replaces the
    stored config, and is required for a weight-only file."""
    from .dlfr import emt_dlfr

    config = config or checkpoint.config
    if config is None:
        raise CheckpointError(f"{checkpoint.source} holds weights only, no model config: pass the config it was "
                              "trained with, from_pretrained(path, config=EMTDLFRConfig(...)) (from MMSA's args: "
                              "mmsa_emt.mmsa.config.model_config_from_args(args)), or -c/--config CONFIG to "
                              "`mmsa-emt test`")
    model = emt_dlfr(config)
    load_into(model, checkpoint)
    return model.eval()


def from_pretrained(path: str | os.PathLike, *, config: EMTDLFRConfig | None = None,
                    map_location: Any = "cpu") -> nn.Module:
    """A ready EMT-DLFR model (``DLFR``, eval mode) from a checkpoint file: built from the config the file carries
    (the text encoder from its stored transformers config, nothing downloaded) and loaded strictly, on the device
    ``map_location`` names (a device or its name; the CPU otherwise). ``config`` is needed for a weight-only file
    (and replaces the stored one otherwise)."""
    model = build(read(path, map_location=map_location), config)
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


def check_input_widths(config: EMTDLFRConfig, audio_dim: int, vision_dim: int, where: str) -> None:
    """Audio/vision feature widths of the input must be the ones the model was trained on."""
    for name, given, expected in (("audio", audio_dim, config.audio_dim), ("vision", vision_dim, config.vision_dim)):
        if name in config.modalities and given != expected:
            raise ValueError(f"{where}: {name} features are {given} wide, but the model was trained on {expected}-wide "
                             f"{name} features")
