"""Everything that changes how EMT-DLFR is computed, not what: the one seam between the paper's modules and the
speed machinery (docs/speed.md). The paper's modules (``model``, ``dlfr``, ``nn``) never import this package.

``apply(model, speed, device)`` turns a model built the paper's way into one that computes per ``speed`` by
swapping module classes for subclasses defined here (``module.__class__ = ...``): the parameters, buffers and
state-dict keys stay the same, and ``apply(model, PRESETS["faithful"])`` turns it back. The training loop takes
the rest from ``SpeedConfig``: batch preparation (trimming, transfer), autocast, compilation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dlfr import DLFR
from ..model import EMTDLFR
from ..nn.attention import Attention
from ..nn.emt import EMT, HalfMPU
from ..nn.encoders import BertTextEncoder, SequenceEncoder
from .config import (
    FAITHFUL,
    FAST,
    LEVERS,
    PRECISIONS,
    PRESETS,
    REMOVED,
    SpeedConfig,
    auto_precision,
    compile_model,
    from_settings,
    speed_config,
)
from .dropout import use_numpy_dropout
from .encoders import FastBertTextEncoder, PaddedSequenceEncoder
from .fusion import FastAttention, FastHalfMPU, JoinedEMT
from .views import FastEMTDLFR, FusedViewsDLFR

__all__ = ["FAITHFUL", "FAST", "LEVERS", "PRECISIONS", "PRESETS", "REMOVED", "SpeedConfig", "apply",
           "auto_precision", "compile_model", "from_settings", "speed_config"]


def apply(model: nn.Module, speed: SpeedConfig | str = "fast", device: torch.device | str = "cpu") -> nn.Module:
    """Makes ``model`` (a ``DLFR``, an ``EMTDLFR`` or any module holding their parts) compute per ``speed`` (a
    SpeedConfig or a preset name; 'auto' values resolved for ``device``), in place; returns it. Parameters, buffers
    and state-dict keys are untouched. ``compile`` is left to ``SpeedConfig.prepare_model`` (the trainer)."""
    s = (speed_config(speed) if isinstance(speed, str) else speed).resolved(device)
    joined: set[int] = set()  # the modules inside a JoinedEMT: they take joined sequences
    for emt in [m for m in model.modules() if isinstance(m, EMT)]:
        shared = len({id(directions) for directions in emt.layers[0]}) == 1  # modality_share
        _become(emt, EMT, JoinedEMT, s.stack_modalities == "time" and shared)
        if isinstance(emt, JoinedEMT):
            joined.update(id(m) for m in emt.modules())
    for module in model.modules():
        if isinstance(module, DLFR):
            _become(module, DLFR, FusedViewsDLFR, s.fused_views)
        elif isinstance(module, EMTDLFR):
            _become(module, EMTDLFR, FastEMTDLFR, s.pinned_transfer)
        elif isinstance(module, HalfMPU):
            _become(module, HalfMPU, FastHalfMPU, bool(s.checkpoint_fusion) or id(module) in joined)
            module.checkpoint_ff = bool(s.checkpoint_fusion)
        elif isinstance(module, Attention):
            _become(module, Attention, FastAttention, s.fused_attention or id(module) in joined)
            module.fused = s.fused_attention
        elif isinstance(module, BertTextEncoder):
            if isinstance(module, FastBertTextEncoder):
                module.configure(fused_qkv=False, checkpoint=False)  # back to transformers' own layers
            _become(module, BertTextEncoder, FastBertTextEncoder,
                    s.encoder_fused_qkv or s.checkpoint_encoder or s.fused_attention)
            if isinstance(module, FastBertTextEncoder):
                module.configure(fused_qkv=s.encoder_fused_qkv, checkpoint=s.checkpoint_encoder)
        elif isinstance(module, SequenceEncoder):
            _become(module, SequenceEncoder, PaddedSequenceEncoder, not s.packed_lstm)
    use_numpy_dropout(model, s.numpy_dropout)
    return model


def _become(module: nn.Module, paper: type, fast: type, on: bool) -> None:
    """``module`` of the paper's class or of its fast subclass, per ``on``."""
    module.__class__ = fast if on else paper
