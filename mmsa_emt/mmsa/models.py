"""MMSA's model and trainer factories (``AMIO``, ``ATIO``) extended with the registered models, and the strict
loading of their weights (``load_weights``, ``_load_checkpoint``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from easydict import EasyDict
from MMSA.models.AMIO import AMIO as _MMSA_AMIO
from MMSA.trains.ATIO import ATIO as _MMSA_ATIO
from torch import Tensor, nn

from .. import fast
from ..dlfr import DLFR, upgrade_state_dict
from ..registry import get_builder
from .config import is_ours as _is_ours
from .config import translate
from .trainer import EMTDLFRTrainer

logger = logging.getLogger("MMSA")


class CheckpointError(ValueError):
    """A weights file that cannot be, or must not be, loaded into the model asked for."""


def _load_checkpoint(f: Any, *args: Any, **kwargs: Any) -> Any:
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


def _refuse_unmarked_padding(name: str, frames: Tensor, where: str) -> None:
    """No lengths were given: a trailing all-zero frame is, in MMSA's feature files, padding, and reading it as a
    real frame changes the prediction; so it is refused rather than guessed."""
    last_zero = (frames[:, -1] == 0).all(dim=-1) if frames.shape[1] else torch.zeros(0, dtype=torch.bool)
    if bool(last_zero.any()):
        rows = last_zero.nonzero()[:, 0].tolist()
        raise ValueError(f"{where}: the last frame of '{name}' is all zeros (sample(s) {rows[:5]}) and no "
                         f"{name}_lengths were given; zero frames at the end are padding in MMSA's feature files "
                         f"and would be read as real frames. Give {name}_lengths (the number of real frames; the "
                         f"full length if the zero frames are real)")


class AMIO(_MMSA_AMIO):
    """MMSA's model wrapper, extended with the registered models (state-dict keys stay 'Model.*'). For those,
    ``load_state_dict`` is always strict (``load_weights``) and ``forward`` without lengths refuses trailing
    all-zero frames (``_refuse_unmarked_padding``)."""

    _ours = False

    def __init__(self, args: EasyDict) -> None:
        if not _is_ours(args):
            super().__init__(args)
            return
        nn.Module.__init__(self)
        self._ours = True
        self.need_model_aligned = False
        run = translate(args)
        self.Model = fast.apply(get_builder(args["model_name"])(run.model), run.speed, run.device)
        text_out = args.get("text_out")
        width = self.Model.utterance_dims.get("text")
        if text_out is not None and width is not None and int(text_out) != width:
            logger.info(f"text_out={text_out} in the config; the text width follows the loaded encoder: "
                        f"{width}")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if not self._ours:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return load_weights(self, state_dict)  # strict whatever the caller asks (MMSA_test: strict=False)

    def forward(self, text_x: Tensor, audio_x: Tensor, video_x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """MMSA's inference call; for our models (text, audio, vision[, audio_lengths, vision_lengths])."""
        if not self._ours:
            return super().forward(text_x, audio_x, video_x, *args, **kwargs)
        return self._forward_ours(text_x, audio_x, video_x, *args, **kwargs)

    def _forward_ours(self, text: Tensor, audio: Tensor, vision: Tensor, audio_lengths: Tensor | None = None,
                      vision_lengths: Tensor | None = None) -> dict[str, Tensor]:
        for name, frames, lengths in (("audio", audio, audio_lengths), ("vision", vision, vision_lengths)):
            if lengths is None:
                _refuse_unmarked_padding(name, frames, type(self.Model).__name__)
        return self.Model(text, audio, vision, audio_lengths, vision_lengths)


class ATIO(_MMSA_ATIO):
    """MMSA's trainer factory, extended with the registered models."""

    def getTrain(self, args: EasyDict):
        return EMTDLFRTrainer(args) if _is_ours(args) else super().getTrain(args)
