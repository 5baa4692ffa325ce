"""MMSA's model and trainer factories (``AMIO``, ``ATIO``) extended with the registered models, and the strict
loading of their weights (``load_weights``, ``_load_checkpoint``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import MMSA.run as mmsa_run
import torch
from easydict import EasyDict
from MMSA.models.AMIO import AMIO as _MMSA_AMIO
from MMSA.trains.ATIO import ATIO as _MMSA_ATIO
from torch import Tensor, nn

from .. import checkpoint, fast
from ..checkpoint import CheckpointError, load_weights  # noqa: F401  (re-exported)
from ..registry import canonical_name, get_builder, list_models
from .config import is_ours as _is_ours
from .config import translate
from .trainer import EMTDLFRTrainer

logger = logging.getLogger("MMSA")


def _load_checkpoint(f: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` whose errors name the file (``checkpoint.load_file``); a checkpoint that carries its config
    gives its state dict, as a weight-only file does (MMSA's ``_run`` reloads the best weights through this)."""
    return checkpoint.state_dict_of(checkpoint.load_file(f, *args, **kwargs), str(getattr(f, "name", f)))


def load_trained(model: nn.Module, path: str | os.PathLike) -> None:
    """Loads the weights file at ``path`` (packaged or weight-only; errors name the file) into ``model`` (an AMIO)."""
    model.load_state_dict(_load_checkpoint(path, map_location="cpu"))


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


def mmsa_model_names() -> list[str]:
    """MMSA's own models as its model list spells them (TFR-Net, which MMSA runs but does not list, included)."""
    ours = {name.upper() for name in list_models()}
    return [m for m in mmsa_run.SUPPORTED_MODELS if m not in ours] + ["TFR_Net"]


def display_name(model_name: str) -> str:
    """'emt_dlfr' -> 'EMT-DLFR', 'self_mm' -> 'Self_MM': the spelling of MMSA's model list."""
    key = canonical_name(model_name)
    if key is not None:
        return key.upper()
    known = {m.lower(): m for m in mmsa_model_names()}
    return known.get(model_name.lower(), model_name)
