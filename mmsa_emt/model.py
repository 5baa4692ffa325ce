"""EMT-DLFR network (Sun, Lian, Liu, Tao, IEEE TAC 2023, arXiv 2208.07589): one view in, prediction out.

Text goes through BERT ([CLS] = utterance vector h_l, the tokens after it = local sequence), audio and vision
through LSTMs (h_a, h_v and per-frame outputs). The three utterance vectors, projected to d_model, form the global
multimodal context G (Eq. 4); the EMT promotes G and the local sequences (Sec. 3.3); the head predicts sentiment
from [h_l, h_a, h_v, flatten(G)] (Eq. 10). The dual-level feature restoration heads used only in training, and the
loss, belong to the objective that wraps this network (``dlfr.DLFR``).
Layer sizes, the order of operations and the parameter count of every part follow the authors' released code
(models/missingTask/EMT_DLFR.py), and so does the way each part computes: how to compute it faster, with the same
numbers, is ``mmsa_emt.fast``'s business (``fast.apply``), which this module never imports.

Shape legend: b batch, l text tokens, t frames, m modalities, d model width, e encoder width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .nn.emt import EMT
from .nn.encoders import BertTextEncoder, SequenceEncoder, length_mask

MODALITIES = ("text", "audio", "vision")


@dataclass
class EMTDLFRConfig:
    """Explicit hyper-parameters of the network (names of the authors' config in comments)."""

    pretrained: str  # hub name or local BERT folder
    audio_dim: int  # feature_dims[1]
    vision_dim: int  # feature_dims[2]
    finetune_bert: bool = True  # use_finetune
    audio_hidden: int = 32  # a_lstm_hidden_size
    vision_hidden: int = 64  # v_lstm_hidden_size
    audio_lstm_layers: int = 1
    vision_lstm_layers: int = 1
    audio_lstm_dropout: float = 0.0
    vision_lstm_dropout: float = 0.0
    audio_out: int = 16
    vision_out: int = 32  # video_out
    d_model: int = 128
    fusion_layers: int = 3
    heads: int = 4
    ff_expansion: int = 4
    emb_dropout: float = 0.0
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    learnable_pos_emb: bool = False
    max_seq_len: int = 1024
    mpu_share: bool = True
    modality_share: bool = True
    layer_share: bool = True
    pool_activation: str = "tanh"  # attn_act_fn
    post_fusion_dim: int = 256
    post_fusion_dropout: float = 0.0
    predictor_dims: dict[str, int] = field(
        default_factory=lambda: {"context": 128, "text": 256, "audio": 8, "vision": 16})
    modalities: tuple[str, ...] = MODALITIES  # any non-empty subset, e.g. ("audio", "vision")
    # the text encoder's transformers config (PretrainedConfig.to_dict()); when set, the encoder is built from it
    # with untrained weights instead of loaded from ``pretrained`` (a checkpoint's weights follow, see checkpoint.py)
    encoder_config: dict[str, Any] | None = None


@dataclass
class ViewOutput:
    """Everything one view of a sample yields; the objective reads what it needs."""

    pred: Tensor  # (b, 1)
    utterance: dict[str, Tensor]  # h_l (b, e), h_a (b, audio_out), h_v (b, vision_out)
    context: Tensor  # flatten(G_L): (b, m*d)
    local: dict[str, Tensor]  # promoted local sequences Z_m: (b, t_m, d)
    text_tokens: Tensor | None  # BERT features of the tokens after [CLS]: (b, l-1, e); None without text


class EMTDLFR(nn.Module):
    """The network; ``forward`` is MMSA's generic inference call and returns {'M': prediction}.

    ``config.modalities`` may be any non-empty subset of text/audio/vision (kept in that order); the global
    context then has one token per modality used, and the other inputs are ignored.
    """

    def __init__(self, config: EMTDLFRConfig) -> None:
        super().__init__()
        c = self.config = config
        unknown = set(c.modalities) - set(MODALITIES)
        if unknown or not c.modalities:
            raise ValueError(f"modalities={list(c.modalities)}: choose a non-empty subset of {list(MODALITIES)}")
        self.modalities = tuple(m for m in MODALITIES if m in c.modalities)
        if "text" in self.modalities:
            self.text_encoder = BertTextEncoder(c.pretrained, finetune=c.finetune_bert, config=c.encoder_config)
        if "audio" in self.modalities:
            self.audio_encoder = SequenceEncoder(c.audio_dim, c.audio_hidden, c.audio_out,
                                                 num_layers=c.audio_lstm_layers, dropout=c.audio_lstm_dropout)
        if "vision" in self.modalities:
            self.vision_encoder = SequenceEncoder(c.vision_dim, c.vision_hidden, c.vision_out,
                                                  num_layers=c.vision_lstm_layers, dropout=c.vision_lstm_dropout)
        widths = self.utterance_dims
        self.projections = nn.ModuleDict({  # bias-free, Identity where the width already is d_model
            m: nn.Linear(w, c.d_model, bias=False) if w != c.d_model else nn.Identity() for m, w in widths.items()})
        self.emt = EMT(c.d_model, depth=c.fusion_layers, heads=c.heads, num_modalities=len(self.modalities),
                       ff_expansion=c.ff_expansion, attn_dropout=c.attn_dropout, ff_dropout=c.ff_dropout,
                       emb_dropout=c.emb_dropout, learnable_pos_emb=c.learnable_pos_emb, max_seq_len=c.max_seq_len,
                       mpu_share=c.mpu_share, modality_share=c.modality_share, layer_share=c.layer_share,
                       pool_activation=c.pool_activation)
        context_dim = len(self.modalities) * c.d_model
        self.head = nn.Sequential(
            nn.Dropout(c.post_fusion_dropout),
            nn.Linear(sum(widths.values()) + context_dim, c.post_fusion_dim), nn.ReLU(),
            nn.Linear(c.post_fusion_dim, c.post_fusion_dim), nn.ReLU(),
            nn.Linear(c.post_fusion_dim, 1),
        )
        self.train()  # from_pretrained leaves BERT in eval mode: a new network is in one mode, training

    @property
    def utterance_dims(self) -> dict[str, int]:
        """Widths of h_l (the encoder's hidden size, not a configured 768), h_a and h_v, for the modalities used."""
        widths = {"text": lambda: self.text_encoder.hidden_size, "audio": lambda: self.config.audio_out,
                  "vision": lambda: self.config.vision_out}
        return {m: widths[m]() for m in self.modalities}

    def encode(self, modality: str, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """One modality -> (utterance vector (b, w), local sequence (b, t, w), valid lengths (b,) on x's device)."""
        if modality == "text":
            tokens = self.text_encoder(x)  # (b, l, e)
            lengths = (x[:, 1].sum(dim=1).long() - 2).clamp(min=1)  # tokens between [CLS] and [SEP]
            return tokens[:, 0], tokens[:, 1:], lengths  # [CLS]: (b, e); after it: (b, l-1, e)
        encoder = self.audio_encoder if modality == "audio" else self.vision_encoder
        lengths = lengths.clamp(min=1)
        local, utterance = encoder(x, lengths)  # (b, max(lengths), out), (b, out)
        return utterance, local, lengths.to(x.device)

    def forward_view(self, text: Tensor, audio: Tensor, vision: Tensor, audio_lengths: Tensor,
                     vision_lengths: Tensor) -> ViewOutput:
        """text (b, 3, l) as MMSA's text_bert; audio (b, t_a, f_a); vision (b, t_v, f_v); lengths (b,) on CPU."""
        inputs = {"text": (text, None), "audio": (audio, audio_lengths), "vision": (vision, vision_lengths)}
        encoded = {m: self.encode(m, *inputs[m]) for m in self.modalities}
        utterance = {m: u for m, (u, _, _) in encoded.items()}
        context = torch.stack([self.projections[m](utterance[m]) for m in self.modalities], dim=1)  # G: (b, m, d)
        local = [self.projections[m](seq) for m, (_, seq, _) in encoded.items()]  # (b, t_m, d) each
        masks = [length_mask(n, seq.shape[1]) for (_, seq, n) in encoded.values()]
        context, promoted = self.emt(context, local, masks)
        context = rearrange(context, "b m d -> b (m d)")
        pred = self.head(torch.cat([*utterance.values(), context], dim=-1))  # (b, 1)
        return ViewOutput(pred=pred, utterance=utterance, context=context,
                          local=dict(zip(self.modalities, promoted)),
                          text_tokens=encoded["text"][1] if "text" in encoded else None)

    def forward(self, text: Tensor, audio: Tensor, vision: Tensor, audio_lengths: Tensor | None = None,
                vision_lengths: Tensor | None = None) -> dict[str, Tensor]:
        """One view, as ``MMSA_test`` calls it (without lengths every frame counts as valid)."""
        full = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long)
        audio_lengths = full if audio_lengths is None else audio_lengths
        vision_lengths = torch.full_like(full, vision.shape[1]) if vision_lengths is None else vision_lengths
        return {"M": self.forward_view(text, audio, vision, audio_lengths.cpu(), vision_lengths.cpu()).pred}

    def parts(self) -> dict[str, nn.Module]:
        """The network's parts by the names the parameter counts use."""
        encoders = {"text encoder (BERT)": "text_encoder", "audio LSTM": "audio_encoder",
                    "vision LSTM": "vision_encoder"}
        parts = {name: getattr(self, attr) for name, attr in encoders.items() if hasattr(self, attr)}
        return {**parts, "projections": self.projections, "EMT fusion": self.emt, "prediction head": self.head}
