"""One speed config: every lever that changes how EMT-DLFR is computed, never what (docs/speed.md).

Two named presets: ``faithful`` computes the authors' way (explicit attention, two passes, packed LSTMs, torch's
dropout, full padding, fp32, the loss read back every step) and ``fast`` is the shipped default. ``speed_config``
takes a preset plus per-key overrides; ``from_settings`` reads the flat config keys of an MMSA config. 'auto'
values follow the device (``SpeedConfig.resolved``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..dlfr import TwoViewBatch
from .views import transferred, trimmed

_log = logging.getLogger(__name__)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STACKINGS = (None, "time", "auto")


@dataclass(frozen=True)
class SpeedConfig:
    """How the work is done, not what is computed. The field defaults are the values a config without these keys
    has always had; ``PRESETS`` holds the two named settings."""

    # the model (``apply``)
    fused_attention: bool = True  # PyTorch's fused attention kernels; False: explicit score matrices
    fused_views: bool = True  # both views in one pass; False: two passes
    stack_modalities: str | None = None  # "time": the fusion's modalities joined along time; "auto": on CUDA
    checkpoint_fusion: bool | str = False  # the fusion's feed-forward recomputed in backward; "auto": True
    checkpoint_encoder: bool = False  # BERT's layers recomputed in backward
    encoder_fused_qkv: bool = True  # BERT's query/key/value in one matmul
    packed_lstm: bool = False  # True: LSTMs over packed sequences; False: over the padded batch
    numpy_dropout: bool = True  # CPU dropout masks from numpy's generator; False: torch's
    # the training loop
    precision: str = "fp32"  # fp32 | bf16 | fp16 (with loss scaling) | auto: autocast of the forward pass
    trim_padding: bool = True  # each batch cut to its longest sequences
    trim_multiple: int | None = None  # trimmed lengths rounded up to a multiple of it; None: 8 on CUDA, else 1
    pinned_transfer: bool = True  # host-to-device copies through pinned memory, without blocking the host
    compile: bool = False  # torch.compile of the text encoder and the fusion
    sync_every_step: bool = False  # the loss read back to the host every step, as the authors' loop does

    def __post_init__(self) -> None:
        if self.precision not in (*PRECISIONS, "auto"):
            raise ValueError(f"precision='{self.precision}' is not one of {[*sorted(PRECISIONS), 'auto']}")
        if self.stack_modalities not in STACKINGS:
            raise ValueError(f"stack_modalities={self.stack_modalities!r}: choose false, \"time\" (modalities joined "
                             "along time) or \"auto\" (\"time\" on CUDA)")
        if self.checkpoint_fusion not in (True, False, "auto"):
            raise ValueError(f"checkpoint_fusion={self.checkpoint_fusion!r}: choose true, false or \"auto\"")
        if self.trim_multiple is not None and self.trim_multiple < 1:
            raise ValueError(f"trim_multiple={self.trim_multiple}: trimmed lengths need a multiple >= 1")

    def resolved(self, device: torch.device | str) -> SpeedConfig:
        """The 'auto' values made concrete for ``device``: precision (``auto_precision``), stack_modalities ("time"
        on CUDA, where launches set the pace; off elsewhere), checkpoint_fusion (on)."""
        stacking = self.stack_modalities
        if stacking == "auto":
            stacking = "time" if torch.device(device).type == "cuda" else None
        return dataclasses.replace(
            self, precision=auto_precision(device) if self.precision == "auto" else self.precision,
            stack_modalities=stacking,
            checkpoint_fusion=True if self.checkpoint_fusion == "auto" else self.checkpoint_fusion)

    def autocast(self, device: torch.device | str) -> torch.autocast:
        precision = self.resolved(device).precision
        return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision], enabled=precision != "fp32")

    def prepare(self, batch: TwoViewBatch, device: torch.device | str) -> TwoViewBatch:
        """The batch trimmed and on ``device``. On CUDA the trimmed lengths are multiples of 8: then the key masks
        over text and frames are aligned as the memory-efficient attention kernel needs them, where an unaligned
        one is copied into a padded buffer on every call (PyTorch's ``preprocess_mask``), and fewer shapes come
        round (kernel plans, compilation)."""
        if self.trim_padding:
            batch = trimmed(batch, self.trim_multiple or (8 if torch.device(device).type == "cuda" else 1))
        return transferred(batch, device) if self.pinned_transfer else batch.to(device)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return compile_model(model) if self.compile else model


FAITHFUL = SpeedConfig(fused_attention=False, fused_views=False, stack_modalities=None, checkpoint_fusion=False,
                       checkpoint_encoder=False, encoder_fused_qkv=False, packed_lstm=True, numpy_dropout=False,
                       precision="fp32", trim_padding=False, pinned_transfer=False, compile=False,
                       sync_every_step=True)
FAST = SpeedConfig(stack_modalities="auto", checkpoint_fusion=True, precision="auto")
PRESETS: dict[str, SpeedConfig] = {"faithful": FAITHFUL, "fast": FAST}
LEVERS = tuple(f.name for f in dataclasses.fields(SpeedConfig))
# levers taken out: the value they had when shipped (still accepted, with a warning) and why
REMOVED: dict[str, tuple[Any, str]] = {
    "encoder_cast_once": (False, "superseded by reuse_weight_casts, itself removed since"),
    "encoder_autocast": (True, "BERT kept in float32/TF32 under autocast was slower on the GPU it was measured on "
                               "(docs/speed.md); BERT now always runs under the run's precision"),
    "reuse_weight_casts": (True, "Linear weights cast once per optimizer step showed no gain in time or memory on "
                                 "the GPU or the CPUs it was measured on (docs/speed.md); autocast casts them"),
    "cache_positions": (True, "the sinusoid position table built once and sliced showed no gain in time on the CPU "
                              "it was measured on, and saved 39 of ~1,600 operations per mini-batch (docs/speed.md)"),
}


def speed_config(preset: str | SpeedConfig = "fast", **overrides: Any) -> SpeedConfig:
    """A preset ('faithful' or 'fast', or a SpeedConfig) with some levers set otherwise; an unknown key is refused
    naming the closest one, a removed lever is accepted only at the value it shipped with."""
    base = PRESETS.get(preset) if isinstance(preset, str) else preset
    if base is None:
        raise ValueError(f"speed='{preset}' is not a preset; choose one of {sorted(PRESETS)}")
    for key in [k for k in overrides if k in REMOVED]:
        shipped, why = REMOVED[key]
        value = overrides.pop(key)
        if value != shipped:
            raise ValueError(f"{key}={value!r}: this setting was removed ({why}); drop it from the config")
        warnings.warn(f"{key}={value!r} no longer does anything ({why}); drop it from the config", stacklevel=2)
    unknown = [k for k in overrides if k not in LEVERS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, LEVERS, n=1) for k in unknown}
        raise ValueError("unknown speed setting " + ", ".join(
            f"'{k}'" + (f" (did you mean '{hints[k][0]}'?)" if hints[k] else "") for k in unknown)
            + f"; the settings are {', '.join(LEVERS)}")
    if overrides.get("stack_modalities") is False:
        overrides["stack_modalities"] = None  # configs write false
    if overrides.get("stack_modalities") == "batch":
        raise ValueError("stack_modalities=\"batch\": this setting was removed (modalities stacked along the batch "
                         "were slower and larger than joined along time on every GPU measured, docs/speed.md); use "
                         "\"time\", \"auto\" or false")
    return dataclasses.replace(base, **overrides)


def from_settings(settings: Mapping[str, Any], device: torch.device | str = "cpu") -> SpeedConfig:
    """The speed config of an MMSA config: ``speed`` names the preset, the flat lever keys present override it.
    Without a ``speed`` key the field defaults of ``SpeedConfig`` apply (a config written before the presets
    computes as it did). Resolved against ``device``."""
    preset = settings.get("speed")
    keys = {k: settings[k] for k in (*LEVERS, *REMOVED) if k in settings}
    return speed_config(SpeedConfig() if preset is None else str(preset), **keys).resolved(device)


def auto_precision(device: torch.device | str) -> str:
    """``precision: auto``: 'bf16' where the hardware multiplies bf16 matrices natively, else 'fp32'.

    CUDA: bf16 from Ampere on (``torch.cuda.is_bf16_supported`` without emulation; older cards would emulate it).
    CPU: x86 with AMX-BF16 (Sapphire Rapids and later Xeons); other CPUs have no bf16 matrix units and convert in
    software. Test metrics in bf16 and fp32 agree within seed noise (benchmarks/metrics_report.py).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 cannot leave emulation out: NVIDIA's bf16 units came with Ampere (sm_80)
            native = torch.cuda.get_device_capability(device)[0] >= 8
        return "bf16" if native else "fp32"
    if device.type == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: fp32 there
        return "bf16" if capabilities is not None and capabilities().get("amx_bf16", False) else "fp32"
    return "fp32"


def compile_model(model: nn.Module, *, backend: str | Callable = "inductor") -> nn.Module:
    """Compiles, in place, the parts made of many small kernels: the text encoder and the EMT fusion.

    Shapes are marked dynamic (trimmed batches vary in length), the LSTMs stay eager (one cuDNN/oneDNN call), the
    state dict keeps its keys. Compilation happens on the first batches, so the first steps are slow. Python
    floats (LayerNorm's eps) are traced as constants: traced as inputs, the fusion's shared layers recomputed by
    ``checkpoint_fusion`` at several call sites crash TorchDynamo (pytorch/pytorch#193194). A part whose compiler
    backend fails runs eagerly from then on, with a warning (``_compiled_or_eager``).
    """
    net = getattr(model, "net", model)  # the network inside its DLFR wrapper
    for part in ("text_encoder", "emt"):
        module = getattr(net, part, None)
        if module is not None:
            module.forward = _compiled_or_eager(module.forward, part, backend)
    return model


def _compiled_or_eager(forward: Callable, part: str, backend: str | Callable) -> Callable:
    """``forward`` through ``torch.compile``, traced with TorchDynamo's ``specialize_float`` on, only for itself.

    If the compiler backend fails (Inductor with PyTorch 2.11 stopped in its partitioner on the shipped CUDA config,
    see docs/speed.md), the part runs eagerly from then on and a warning names it and the error:
    the same numbers without the speed-up, not a run lost minutes in. Only that exception is caught; errors of the
    model itself propagate as they would eagerly."""
    compiled = torch.compile(forward, dynamic=True, backend=backend)
    eager = False

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal eager
        if not eager:
            try:
                with torch._dynamo.config.patch(specialize_float=True):
                    return compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as error:
                eager = True
                inner = error.inner_exception
                _log.warning("compile: torch.compile's backend %r failed on %s (%s: %s); %s runs eagerly from now "
                             "on (compile: false skips compiling)", error.backend_name, part,
                             type(inner).__name__, inner, part)
        return forward(*args, **kwargs)

    return call
