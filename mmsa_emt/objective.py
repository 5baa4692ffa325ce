"""Dual-Level Feature Restoration (DLFR, Sec. 3.4 of arXiv 2208.07589) and the one loss used in training and eval.

Each sample is seen twice: complete and randomly incomplete. Low-level: the incomplete view's promoted local
sequences reconstruct the missing input features (Eq. 11). High-level: SimSiam pulls the two views' utterance
vectors and final contexts together (Eqs. 12-13). The weighting of the total loss follows the authors' released
trainer (trains/missingTask/EMT_DLFR.py):

    L = L1(pred_incomplete, y) + w_attra * (sum of attraction terms + L1(pred_complete, y)) + w_recon * sum(recon)

Shape legend: b batch, t steps, f features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.transfer import to_device

if TYPE_CHECKING:
    from .model import EMTDLFR, ViewOutput

RECON_LOSSES = {"SmoothL1Loss": F.smooth_l1_loss, "L1Loss": F.l1_loss, "MSELoss": F.mse_loss}
EPS = 1e-6


class Projector(nn.Module):
    """SimSiam projector: Linear(D, D) + BatchNorm1d without affine parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim, affine=False))

    def forward(self, x: Tensor, views: int = 1) -> Tensor:
        """x (v b, D): ``views`` views stacked along the batch, each batch-normalised on its own."""
        linear, norm = self.net
        return per_view(norm, linear(x), views)


class Predictor(nn.Module):
    """SimSiam predictor: Linear(D, P, no bias) + BatchNorm1d + ReLU + Linear(P, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: Tensor, views: int = 1) -> Tensor:
        """x (v b, D): ``views`` views stacked along the batch, each batch-normalised on its own."""
        first, norm, act, last = self.net
        return last(act(per_view(norm, first(x), views)))


def per_view(norm: nn.Module, x: Tensor, views: int) -> Tensor:
    """BatchNorm over each view's rows on its own, in order: x (v b, D) -> (v b, D). Batch statistics and the
    running-statistic updates are those of ``views`` separate calls; the layers around it run once for all."""
    return norm(x) if views == 1 else torch.cat([norm(rows) for rows in x.chunk(views)])


class DualLevelRestoration(nn.Module):
    """Training-only heads: projector and predictor per attracted vector, a reconstruction Linear per modality."""

    def __init__(self, *, context_dim: int, utterance_dims: dict[str, int], d_model: int,
                 input_dims: dict[str, int], predictor_dims: dict[str, int]) -> None:
        super().__init__()
        dims = {"context": context_dim, **utterance_dims}
        if set(predictor_dims) != set(dims):
            raise ValueError(f"predictor_dims needs the keys {sorted(dims)}, got {sorted(predictor_dims)}")
        self.projectors = nn.ModuleDict({k: Projector(d) for k, d in dims.items()})
        self.predictors = nn.ModuleDict({k: Predictor(d, predictor_dims[k]) for k, d in dims.items()})
        self.reconstructors = nn.ModuleDict({m: nn.Linear(d_model, f) for m, f in input_dims.items()})

    def parts(self) -> dict[str, nn.Module]:
        return {"DLFR projectors": self.projectors, "DLFR predictors": self.predictors,
                "DLFR reconstruction": self.reconstructors}

    def simsiam(self, name: str, x: Tensor, views: int = 1) -> tuple[Tensor, Tensor]:
        """(z, p) for the vectors x (v b, D) of ``views`` views stacked along the batch, each view batch-normalised
        on its own; z is returned without gradient (stop-gradient)."""
        z = self.projectors[name](x, views)
        return z.detach(), self.predictors[name](z, views)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """-cos(p, z) averaged over the batch: p, z (..., b, D) -> (...); z is expected detached."""
    return -F.cosine_similarity(p, z, dim=-1).mean(dim=-1)


def attraction_loss(p_complete: Tensor, z_complete: Tensor, p_incomplete: Tensor, z_incomplete: Tensor) -> Tensor:
    """Symmetric SimSiam loss between the views (Eq. 13): (D(p_inc, z_com) + D(p_com, z_inc)) / 2."""
    return 0.5 * (negative_cosine(p_incomplete, z_complete) + negative_cosine(p_complete, z_incomplete))


def stacked_attraction_losses(p: Sequence[Tensor], z: Sequence[Tensor]) -> Tensor:
    """Eq. 13 (``attraction_loss``) for K heads at once, each with its views stacked: p[k], z[k] (2b, D_k) =
    [complete; incomplete]; returns the K losses (K,). Each view's p meets the other view's z (z rolled by b rows);
    both halves have b rows, so the mean over all 2b is the average of the two D terms. The heads' vectors are
    zero-padded to the widest and stacked, (K, 2b, D): zeros change no dot product and no norm, and one set of
    kernels computes every cosine instead of one set per head (~13 kernels each, forward and backward alike)."""
    widest = max(t.shape[1] for t in p)
    padded = [torch.stack([t if t.shape[1] == widest else F.pad(t, (0, widest - t.shape[1])) for t in ts])
              for ts in (p, z)]  # 2 x (K, 2b, D)
    p_all, z_all = padded
    return negative_cosine(p_all, z_all.roll(z_all.shape[1] // 2, dims=1))  # (K,)


def masked_reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "SmoothL1Loss") -> Tensor:
    """Reconstruction error at the masked steps only (Eq. 11).

    pred, target (b, t, f); mask (b, t), 1 where a step is valid and was dropped in the incomplete view. As in the
    authors' code the summed error is divided by (number of masked elements, i.e. steps x f, + 1e-6); no masked
    step gives 0.
    """
    if kind not in RECON_LOSSES:
        raise ValueError(f"recon_loss={kind!r} is not one of {sorted(RECON_LOSSES)}")
    weight = mask[..., None].to(pred.dtype).expand_as(pred)  # (b, t, f)
    total = RECON_LOSSES[kind](pred * weight, target * weight, reduction="sum")
    return total / (weight.sum() + EPS)


@dataclass
class TwoViewBatch:
    """One mini-batch seen both ways. ``*_dropped`` masks are 1 at valid steps removed from the incomplete view."""

    text: Tensor  # (b, 3, l)
    text_m: Tensor  # (b, 3, l), dropped tokens -> [UNK]
    audio: Tensor  # (b, t_a, f_a)
    audio_m: Tensor  # dropped frames zeroed
    vision: Tensor  # (b, t_v, f_v)
    vision_m: Tensor
    audio_lengths: Tensor  # (b,) CPU
    vision_lengths: Tensor  # (b,) CPU
    text_dropped: Tensor  # (b, l)
    audio_dropped: Tensor  # (b, t_a)
    vision_dropped: Tensor  # (b, t_v)
    labels: Tensor  # (b,)

    def trimmed(self, multiple: int = 1) -> TwoViewBatch:
        """The batch cut to its longest text and frame sequences, rounded up to a multiple of ``multiple`` (at most
        to the padded length); call on the CPU, before ``to``.

        Padding beyond every sample's length changes no output (it is masked or never packed), so this only
        saves the encoders' and the fusion's work on it.
        """
        if multiple < 1:
            raise ValueError(f"trimmed lengths cannot be rounded to a multiple of {multiple}")
        padded = {"text": self.text.shape[-1], "audio": self.audio.shape[1], "vision": self.vision.shape[1]}
        longest = {"text": int(self.text[:, 1].sum(dim=1).max()), "audio": int(self.audio_lengths.max()),
                   "vision": int(self.vision_lengths.max())}
        text_steps, audio_steps, vision_steps = (min(-(-longest[m] // multiple) * multiple, padded[m])
                                                 for m in ("text", "audio", "vision"))
        cut = {"text": text_steps, "text_m": text_steps, "text_dropped": text_steps, "audio": audio_steps,
               "audio_m": audio_steps, "audio_dropped": audio_steps, "vision": vision_steps,
               "vision_m": vision_steps, "vision_dropped": vision_steps}
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, steps in cut.items():
            values[name] = values[name][..., :steps] if name.startswith("text") else values[name][:, :steps]
        return TwoViewBatch(**values)

    def to(self, device: torch.device | str) -> TwoViewBatch:
        """Moves the tensors to ``device``; lengths stay on the CPU (packed LSTMs want them there).

        Towards CUDA the host tensors go through pinned memory, so the copies run without blocking the host.
        """
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if not name.endswith("_lengths"):
                moved[name] = to_device(value, device)
        return TwoViewBatch(**moved)


@dataclass
class LossWeights:
    attraction: float = 1.0  # loss_attra_weight
    reconstruction: float = 1.0  # loss_recon_weight
    recon_kind: str = "SmoothL1Loss"  # recon_loss


@dataclass
class LossOutput:
    total: Tensor
    terms: dict[str, Tensor]  # every component, unweighted, for logging
    pred: Tensor  # incomplete-view prediction (b,): the one that is reported
    pred_complete: Tensor  # (b,)
    view: ViewOutput  # incomplete view, for features


def compute_loss(model: EMTDLFR, batch: TwoViewBatch, weights: LossWeights) -> LossOutput:
    """Runs both views and returns the total DLFR loss; training and evaluation both call this."""
    if model.training and batch.labels.numel() < 2:
        raise ValueError("a training batch of one sample: DLFR's SimSiam heads use BatchNorm, which needs at least "
                         "2 samples per training batch (drop the last batch or change batch_size)")
    if model.config.fused_views:  # one pass over both views stacked along the batch
        both = model.forward_views(batch.text, batch.text_m, batch.audio, batch.audio_m, batch.vision,
                                   batch.vision_m, batch.audio_lengths, batch.vision_lengths)
        complete, incomplete = both.halves()
        vectors = {"context": both.context, **both.utterance}  # (2b, D): complete rows, then incomplete
    else:  # two passes, as the authors
        complete = model.forward_view(batch.text, batch.audio, batch.vision, batch.audio_lengths,
                                      batch.vision_lengths)
        incomplete = model.forward_view(batch.text_m, batch.audio_m, batch.vision_m, batch.audio_lengths,
                                        batch.vision_lengths)
        vectors = {"context": torch.cat([complete.context, incomplete.context]),
                   **{m: torch.cat([complete.utterance[m], incomplete.utterance[m]]) for m in complete.utterance}}
    heads = model.restoration
    labels = batch.labels.reshape(-1)
    terms = {"pred_incomplete": F.l1_loss(incomplete.pred.reshape(-1), labels),
             "pred_complete": F.l1_loss(complete.pred.reshape(-1), labels)}

    # both views through each head at once, BatchNorm per view
    zs, ps = zip(*(heads.simsiam(name, x, views=2) for name, x in vectors.items()))
    attraction_terms = stacked_attraction_losses(ps, zs)  # (heads,): every head's Eq. 13 at once
    terms.update({f"attract_{name}": attraction_terms[k] for k, name in enumerate(vectors)})  # views, for logging

    targets = {"audio": batch.audio, "vision": batch.vision}
    if complete.text_tokens is not None:
        targets["text"] = complete.text_tokens.detach()
    dropped = {"text": batch.text_dropped[:, 1:], "audio": batch.audio_dropped, "vision": batch.vision_dropped}
    for m, promoted in incomplete.local.items():
        steps = promoted.shape[1]  # text: l-1 tokens after [CLS]; audio/vision: longest length in the batch
        terms[f"recon_{m}"] = masked_reconstruction_loss(
            heads.reconstructors[m](promoted), targets[m][:, :steps], dropped[m][:, :steps], weights.recon_kind)

    attraction = attraction_terms.sum() + terms["pred_complete"]  # summed as one tensor: no backward per term
    reconstruction = sum(v for k, v in terms.items() if k.startswith("recon_"))
    total = terms["pred_incomplete"] + weights.attraction * attraction + weights.reconstruction * reconstruction
    return LossOutput(total=total, terms=terms, pred=incomplete.pred.reshape(-1),
                      pred_complete=complete.pred.reshape(-1), view=incomplete)
