"""Dual-Level Feature Restoration (DLFR, Sec. 3.4 of arXiv 2208.07589): the objective that wraps the network.

``DLFR`` holds the network (``model.EMTDLFR``, one view in, prediction out) and the training-only restoration heads,
as x-transformers' ``AutoregressiveWrapper`` holds its net: its ``forward`` is the network's inference call (what
MMSA's AMIO and ``MMSA_test`` call), its ``loss`` the one loss used in training and evaluation.

Each sample is seen twice: complete and randomly incomplete. Low-level: the incomplete view's promoted local
sequences reconstruct the missing input features (Eq. 11). High-level: SimSiam pulls the two views' utterance
vectors and final contexts together (Eqs. 12-13). The weighting of the total loss follows the authors' released
trainer (trains/missingTask/EMT_DLFR.py):

    L = L1(pred_incomplete, y) + w_attra * (sum of attraction terms + L1(pred_complete, y)) + w_recon * sum(recon)

Shape legend: b batch, t steps, f features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import EMTDLFR, EMTDLFRConfig, ViewOutput
from .registry import register_model

RECON_LOSSES = {"SmoothL1Loss": F.smooth_l1_loss, "L1Loss": F.l1_loss, "MSELoss": F.mse_loss}
EPS = 1e-6


class Projector(nn.Module):
    """SimSiam projector: Linear(D, D) + BatchNorm1d without affine parameters."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim, affine=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Predictor(nn.Module):
    """SimSiam predictor: Linear(D, P, no bias) + BatchNorm1d + ReLU + Linear(P, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


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

    def simsiam(self, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, p) for the vectors x (b, D) of one view (Eq. 12); z is returned without gradient (stop-gradient)."""
        z = self.projectors[name](x)
        return z.detach(), self.predictors[name](z)


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """-cos(p, z) averaged over the batch: p, z (..., b, D) -> (...); z is expected detached."""
    return -F.cosine_similarity(p, z, dim=-1).mean(dim=-1)


def attraction_loss(p_complete: Tensor, z_complete: Tensor, p_incomplete: Tensor, z_incomplete: Tensor) -> Tensor:
    """Symmetric SimSiam loss between the views (Eq. 13): (D(p_inc, z_com) + D(p_com, z_inc)) / 2."""
    return 0.5 * (negative_cosine(p_incomplete, z_complete) + negative_cosine(p_complete, z_incomplete))


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

    def to(self, device: torch.device | str) -> TwoViewBatch:
        """Moves the tensors to ``device``; lengths stay on the CPU (packed LSTMs want them there)."""
        return TwoViewBatch(**{f.name: getattr(self, f.name) if f.name.endswith("_lengths")
                               else getattr(self, f.name).to(device) for f in fields(self)})


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


class DLFR(nn.Module):
    """EMT-DLFR: the network ``net`` and the restoration heads ``restoration`` (Sec. 3.4), one state dict for both.

    ``forward`` is the network's one-view inference call ({'M': prediction}); ``loss`` runs both views of a batch
    and returns the total DLFR loss. Checkpoints of the earlier layout, where the network held the heads (keys
    ``text_encoder...``, ``restoration...`` with no ``net.``), load through ``upgrade_state_dict``.
    """

    def __init__(self, net: EMTDLFR) -> None:
        super().__init__()
        self.net = net
        c, widths = net.config, net.utterance_dims
        inputs = {"text": widths.get("text"), "audio": c.audio_dim, "vision": c.vision_dim}
        self.restoration = DualLevelRestoration(
            context_dim=len(net.modalities) * c.d_model, utterance_dims=widths, d_model=c.d_model,
            input_dims={m: inputs[m] for m in net.modalities},
            predictor_dims={k: v for k, v in c.predictor_dims.items() if k == "context" or k in net.modalities},
        )
        self.register_load_state_dict_pre_hook(_upgrade_hook)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, config: EMTDLFRConfig | None = None,
                        map_location: Any = "cpu") -> DLFR:
        """A ready model (eval mode) from a checkpoint that carries its config, Hugging Face style; a weight-only
        file needs ``config`` (``mmsa_emt.checkpoint.from_pretrained``)."""
        from .checkpoint import from_pretrained

        return from_pretrained(path, config=config, map_location=map_location)

    @property
    def config(self) -> EMTDLFRConfig:
        return self.net.config

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.net.modalities

    @property
    def utterance_dims(self) -> dict[str, int]:
        return self.net.utterance_dims

    def forward(self, text: Tensor, audio: Tensor, vision: Tensor, audio_lengths: Tensor | None = None,
                vision_lengths: Tensor | None = None) -> dict[str, Tensor]:
        """The network's inference call, as MMSA's AMIO and ``MMSA_test`` make it."""
        return self.net(text, audio, vision, audio_lengths, vision_lengths)

    def views(self, batch: TwoViewBatch) -> tuple[ViewOutput, ViewOutput]:
        """The complete and the incomplete view through the network: two passes, as the authors."""
        complete = self.net.forward_view(batch.text, batch.audio, batch.vision, batch.audio_lengths,
                                         batch.vision_lengths)
        incomplete = self.net.forward_view(batch.text_m, batch.audio_m, batch.vision_m, batch.audio_lengths,
                                           batch.vision_lengths)
        return complete, incomplete

    def attraction(self, complete: ViewOutput, incomplete: ViewOutput) -> dict[str, Tensor]:
        """High-level restoration (Eqs. 12-13): per attracted vector (the final context, then h_l, h_a, h_v), the
        symmetric SimSiam loss between the views; each view batch-normalised on its own."""
        terms = {}
        for name in ("context", *complete.utterance):
            x_c, x_i = ((v.context if name == "context" else v.utterance[name]) for v in (complete, incomplete))
            (z_c, p_c), (z_i, p_i) = self.restoration.simsiam(name, x_c), self.restoration.simsiam(name, x_i)
            terms[name] = attraction_loss(p_c, z_c, p_i, z_i)
        return terms

    def loss(self, batch: TwoViewBatch, weights: LossWeights) -> LossOutput:
        """Runs both views and returns the total DLFR loss (module docstring); training and evaluation both call it."""
        if self.training and batch.labels.numel() < 2:
            raise ValueError("a training batch of one sample: DLFR's SimSiam heads use BatchNorm, which needs at "
                             "least 2 samples per training batch (drop the last batch or change batch_size)")
        complete, incomplete = self.views(batch)
        labels = batch.labels.reshape(-1)
        terms = {"pred_incomplete": F.l1_loss(incomplete.pred.reshape(-1), labels),
                 "pred_complete": F.l1_loss(complete.pred.reshape(-1), labels)}
        attraction_terms = self.attraction(complete, incomplete)
        terms.update({f"attract_{name}": term for name, term in attraction_terms.items()})

        targets = {"audio": batch.audio, "vision": batch.vision}  # low level (Eq. 11): the incomplete view restores
        if complete.text_tokens is not None:
            targets["text"] = complete.text_tokens.detach()
        dropped = {"text": batch.text_dropped[:, 1:], "audio": batch.audio_dropped, "vision": batch.vision_dropped}
        for m, promoted in incomplete.local.items():
            steps = promoted.shape[1]  # text: l-1 tokens after [CLS]; audio/vision: longest length in the batch
            terms[f"recon_{m}"] = masked_reconstruction_loss(self.restoration.reconstructors[m](promoted),
                                                             targets[m][:, :steps], dropped[m][:, :steps],
                                                             weights.recon_kind)

        attraction = sum(attraction_terms.values()) + terms["pred_complete"]
        reconstruction = sum(v for k, v in terms.items() if k.startswith("recon_"))
        total = terms["pred_incomplete"] + weights.attraction * attraction + weights.reconstruction * reconstruction
        return LossOutput(total=total, terms=terms, pred=incomplete.pred.reshape(-1),
                          pred_complete=complete.pred.reshape(-1), view=incomplete)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (shared parameters counted once), as in the authors' code."""
        counts = {name: sum(p.numel() for p in part.parameters())
                  for name, part in {**self.net.parts(), **self.restoration.parts()}.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


def compute_loss(model: DLFR, batch: TwoViewBatch, weights: LossWeights) -> LossOutput:
    """``model.loss(batch, weights)``: both views and the total DLFR loss; training and evaluation both call this."""
    if not isinstance(model, DLFR):
        raise TypeError(f"compute_loss needs the network wrapped with its restoration heads, DLFR(net); got "
                        f"{type(model).__name__} (build it with mmsa_emt.registry.get_builder('emt-dlfr')(config) "
                        "or DLFR(EMTDLFR(config)))")
    return model.loss(batch, weights)


def upgrade_state_dict(state: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A state dict of the earlier layout (the network held the heads: ``{prefix}text_encoder...``,
    ``{prefix}restoration...``) in this one (``{prefix}net.text_encoder...``, ``{prefix}restoration...``); a state
    dict already in this layout, and keys outside ``prefix``, are returned as they are."""
    ours = [k for k in state if k.startswith(prefix)]
    if any(k[len(prefix):].startswith("net.") for k in ours):
        return dict(state)
    moved = {k: prefix + "net." + k[len(prefix):] for k in ours if not k[len(prefix):].startswith("restoration.")}
    return {moved.get(k, k): v for k, v in state.items()}


def _upgrade_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: rewrites an earlier layout's keys in place (``upgrade_state_dict``)."""
    upgraded = upgrade_state_dict({k: state_dict[k] for k in list(state_dict) if k.startswith(prefix)}, prefix)
    if upgraded.keys() != {k for k in state_dict if k.startswith(prefix)}:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update(upgraded)


@register_model("emt-dlfr", "emt_dlfr")
def emt_dlfr(config: EMTDLFRConfig) -> DLFR:
    """EMT-DLFR as in the paper (arXiv 2208.07589): the network wrapped by its DLFR objective."""
    return DLFR(EMTDLFR(config))
