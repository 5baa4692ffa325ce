"""Unimodal encoders of EMT-DLFR (Sec. 3.2): a fine-tuned BERT for text, one-layer LSTMs for audio and vision.

Shape legend: b batch, l text tokens, t frames, f input features, e hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import AutoConfig, AutoModel


class EncoderNotFoundError(OSError):
    """The pretrained text encoder could not be loaded (offline hub name, missing or incomplete folder)."""


class BertTextEncoder(nn.Module):
    """BERT over MMSA's ``text_bert`` input (b, 3, l) = ids / attention mask / segment ids -> (b, l, e).

    ``pretrained`` is a hub name ('bert-base-uncased') or a local folder holding config.json, the weights and
    vocab.txt. The pooler is kept (so parameter counts match the authors') but frozen: neither uses it.
    """

    def __init__(self, pretrained: str, *, finetune: bool = True, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.bert = load_pretrained_encoder(pretrained) if config is None else encoder_from_config(config)
        self.pretrained, self.finetune = pretrained, finetune
        if getattr(self.bert, "pooler", None) is not None:
            self.bert.pooler.requires_grad_(False)
        if not finetune:
            self.bert.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def forward(self, text: Tensor) -> Tensor:
        ids, mask, segments = text[:, 0].long(), text[:, 1].long(), text[:, 2].long()  # 3 x (b, l)
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            return self.bert(input_ids=ids, attention_mask=mask, token_type_ids=segments).last_hidden_state


def load_pretrained_encoder(pretrained: str) -> nn.Module:
    """Loads a BERT-family encoder from a local folder or the hub, with an error that says what to do offline."""
    local = Path(pretrained).expanduser()
    source = str(local) if local.exists() else pretrained
    if local.exists() and not (local / "config.json").is_file():
        raise EncoderNotFoundError(f"pretrained='{pretrained}' is a folder without config.json; it must hold "
                                   "config.json, the weights (model.safetensors or pytorch_model.bin) and vocab.txt")
    try:
        config = AutoConfig.from_pretrained(source)
        return AutoModel.from_pretrained(source, config=config)
    except OSError as error:
        raise EncoderNotFoundError(
            f"could not load the text encoder pretrained='{pretrained}' ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Without network access, set 'pretrained' in "
            "your config to a local folder holding config.json, the weights and vocab.txt (for example a copy of "
            "bert-base-uncased, or bert-base-chinese for SIMS)."
        ) from error


def encoder_from_config(config: Mapping[str, Any]) -> nn.Module:
    """An encoder of the architecture a transformers config (``PretrainedConfig.to_dict()``) describes, with
    untrained weights and nothing downloaded: a saved checkpoint's weights are loaded into it next."""
    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("the text encoder's config has no 'model_type'; it cannot be rebuilt")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **values))


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(b,) lengths -> (b, max_len) bool mask, True at valid steps."""
    return torch.arange(max_len, device=lengths.device)[None] < lengths[:, None]


class SequenceEncoder(nn.Module):
    """Unidirectional LSTM over the true lengths (packed, as the authors), then one Linear to ``out_dim``.

    Returns the local sequence (every frame's output through the Linear, cut to the longest length in the batch,
    zero before the Linear at padded steps) and the utterance vector (the last layer's state at each sequence's
    last valid step, through dropout and the same Linear).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_dim, out_dim) if hidden_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x (b, t, f); lengths (b,), each >= 1 -> local (b, max(lengths), out), utterance (b, out).

        The recurrence runs in float32 even under autocast: CUDA autocast would hand cuDNN's LSTM float16 whatever
        the autocast dtype, and these LSTMs are too small for it to pay.
        """
        with torch.autocast(x.device.type, enabled=False):
            local, last = self.recurrence(x.to(self.rnn.weight_ih_l0.dtype), lengths)
        return self.proj(local), self.proj(self.dropout(last))

    def recurrence(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Per-step outputs (b, max(lengths), e), zero at padded steps, and the state at the last valid step."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, (h_n, _) = self.rnn(packed)
        local, _ = pad_packed_sequence(outputs, batch_first=True)  # (b, max(lengths), e), zero-padded
        return local, h_n[-1]  # last layer's state: (b, e)
