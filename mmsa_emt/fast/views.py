"""The network and its DLFR objective computed with fewer passes and copies: the same function as ``model`` and
``dlfr``, the same parameters and state-dict keys. ``apply`` swaps these classes in.

- ``FastEMTDLFR``: each sequence's lengths copied to the device once (through pinned memory, without blocking the
  host, ``pinned_transfer``) and handed to the padded LSTM and the fusion's masks alike.
- ``FusedViewsDLFR``: the complete and the incomplete view in one pass, stacked along the batch (``fused_views``):
  every layer of the network works per sample, so this is the computation of two passes. The SimSiam heads take
  both views at once too, each view batch-normalised on its own, and the four attraction losses (Eq. 13) run as one
  set of kernels.
- ``trimmed``: a batch cut to its longest sequences (``trim_padding``).

Shape legend: b batch, D vector width, K attracted vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dlfr import DLFR, DualLevelRestoration, TwoViewBatch, negative_cosine
from ..model import EMTDLFR, ViewOutput
from .encoders import PaddedSequenceEncoder
from .transfer import to_device


class FastEMTDLFR(EMTDLFR):
    """``model.EMTDLFR`` whose sequence lengths reach the device once per modality and pass."""

    pinned_transfer: bool = True  # set by ``apply``

    def encode(self, modality: str, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if modality == "text":
            return super().encode(modality, x, lengths)
        encoder = self.audio_encoder if modality == "audio" else self.vision_encoder
        lengths = lengths.clamp(min=1)
        on_device = to_device(lengths, x.device) if self.pinned_transfer else lengths.to(x.device)
        if isinstance(encoder, PaddedSequenceEncoder):
            local, utterance = encoder(x, lengths, on_device)  # the copy serves the encoder and the masks
        else:
            local, utterance = encoder(x, lengths)
        return utterance, local, on_device


@dataclass
class HalfView(ViewOutput):
    """One view's rows of a pass over both views stacked along the batch; ``whole`` is that pass."""

    whole: ViewOutput | None = None


def half(view: ViewOutput, rows: slice) -> HalfView:
    """The samples ``rows`` of a pass over stacked views."""
    return HalfView(pred=view.pred[rows], utterance={k: v[rows] for k, v in view.utterance.items()},
                    context=view.context[rows], local={k: v[rows] for k, v in view.local.items()},
                    text_tokens=None if view.text_tokens is None else view.text_tokens[rows], whole=view)


class FusedViewsDLFR(DLFR):
    """``dlfr.DLFR`` with both views in one pass of the network and through each SimSiam head at once."""

    def views(self, batch: TwoViewBatch) -> tuple[HalfView, HalfView]:
        both = self.net.forward_view(torch.cat([batch.text, batch.text_m]), torch.cat([batch.audio, batch.audio_m]),
                                     torch.cat([batch.vision, batch.vision_m]),
                                     torch.cat([batch.audio_lengths, batch.audio_lengths]),
                                     torch.cat([batch.vision_lengths, batch.vision_lengths]))  # rows (2b, ...)
        b = batch.labels.reshape(-1).shape[0]
        return half(both, slice(0, b)), half(both, slice(b, 2 * b))

    def attraction(self, complete: ViewOutput, incomplete: ViewOutput) -> dict[str, Tensor]:
        whole = complete.whole if isinstance(complete, HalfView) and isinstance(incomplete, HalfView) \
            and complete.whole is incomplete.whole else None
        if whole is not None:  # complete rows, then incomplete: (2b, D)
            vectors = {"context": whole.context, **whole.utterance}
        else:
            vectors = {"context": torch.cat([complete.context, incomplete.context]),
                       **{m: torch.cat([complete.utterance[m], incomplete.utterance[m]]) for m in complete.utterance}}
        zs, ps = zip(*(stacked_simsiam(self.restoration, name, x) for name, x in vectors.items()))
        return dict(zip(vectors, stacked_attraction_losses(ps, zs)))


def per_view(norm: nn.Module, x: Tensor, views: int) -> Tensor:
    """BatchNorm over each view's rows on its own, in order: x (v b, D) -> (v b, D). Batch statistics and the
    running-statistic updates are those of ``views`` separate calls; the layers around it run once for all."""
    return norm(x) if views == 1 else torch.cat([norm(rows) for rows in x.chunk(views)])


def stacked_simsiam(heads: DualLevelRestoration, name: str, x: Tensor, views: int = 2) -> tuple[Tensor, Tensor]:
    """``heads.simsiam`` for the vectors x (v b, D) of ``views`` views stacked along the batch, each view
    batch-normalised on its own: (z, p) as (v b, D), z without gradient."""
    linear, norm = heads.projectors[name].net
    z = per_view(norm, linear(x), views)
    first, norm, act, last = heads.predictors[name].net
    return z.detach(), last(act(per_view(norm, first(z), views)))


def stacked_attraction_losses(p: Sequence[Tensor], z: Sequence[Tensor]) -> Tensor:
    """Eq. 13 (``dlfr.attraction_loss``) for K heads at once, each with its views stacked: p[k], z[k] (2b, D_k) =
    [complete; incomplete]; returns the K losses (K,). Each view's p meets the other view's z (z rolled by b rows);
    both halves have b rows, so the mean over all 2b is the average of the two D terms. The heads' vectors are
    zero-padded to the widest and stacked, (K, 2b, D): zeros change no dot product and no norm, and one set of
    kernels computes every cosine instead of one set per head (~13 kernels each, forward and backward alike)."""
    widest = max(t.shape[1] for t in p)
    padded = [torch.stack([t if t.shape[1] == widest else F.pad(t, (0, widest - t.shape[1])) for t in ts])
              for ts in (p, z)]  # 2 x (K, 2b, D)
    p_all, z_all = padded
    return negative_cosine(p_all, z_all.roll(z_all.shape[1] // 2, dims=1))  # (K,)


def trimmed(batch: TwoViewBatch, multiple: int = 1) -> TwoViewBatch:
    """The batch cut to its longest text and frame sequences, rounded up to a multiple of ``multiple`` (at most to
    the padded length); call on the CPU, before ``to``.

    Padding beyond every sample's length changes no output (it is masked or never packed), so this only saves the
    encoders' and the fusion's work on it.
    """
    if multiple < 1:
        raise ValueError(f"trimmed lengths cannot be rounded to a multiple of {multiple}")
    padded = {"text": batch.text.shape[-1], "audio": batch.audio.shape[1], "vision": batch.vision.shape[1]}
    longest = {"text": int(batch.text[:, 1].sum(dim=1).max()), "audio": int(batch.audio_lengths.max()),
               "vision": int(batch.vision_lengths.max())}
    steps = {m: min(-(-longest[m] // multiple) * multiple, padded[m]) for m in ("text", "audio", "vision")}
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    for name in ("text", "text_m", "text_dropped"):
        values[name] = values[name][..., :steps["text"]]
    for m in ("audio", "vision"):
        for name in (m, f"{m}_m", f"{m}_dropped"):
            values[name] = values[name][:, :steps[m]]
    return TwoViewBatch(**values)


def transferred(batch: TwoViewBatch, device: torch.device | str) -> TwoViewBatch:
    """``batch.to(device)`` with the host tensors copied through pinned memory towards CUDA, without blocking the
    host; lengths stay on the CPU."""
    return TwoViewBatch(**{f.name: getattr(batch, f.name) if f.name.endswith("_lengths")
                           else to_device(getattr(batch, f.name), device) for f in fields(batch)})
