"""Unimodal encoders of EMT-DLFR (Sec. 3.2): a fine-tuned BERT for text, one-layer LSTMs for audio and vision.

Shape legend: b batch, l text tokens, t frames, f input features, e hidden width.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import AutoConfig, AutoModel

from .dropout import Dropout, replace_dropouts
from .fused_bert import fused_forward, joined_slots, unsupported
from .sdpa import additive_mask, fused_backends, query_dtype
from .transfer import to_device
from .weight_casts import Slot, cast_linear_weights, linear_slots, substituted

logger = logging.getLogger(__name__)
READY_MADE_MASKS = int(transformers.__version__.split(".")[0]) >= 5  # 4-D masks are passed through as they are


class EncoderNotFoundError(OSError):
    """The pretrained text encoder could not be loaded (offline hub name, missing or incomplete folder)."""


class BertTextEncoder(nn.Module):
    """BERT over MMSA's ``text_bert`` input (b, 3, l) = ids / attention mask / segment ids.

    ``pretrained`` is a hub name ('bert-base-uncased') or a local folder holding config.json, the weights and
    vocab.txt. The pooler is kept (so parameter counts match the authors') but frozen: neither uses it.
    ``checkpoint``: in training, each layer's activations are recomputed in the backward pass instead of kept
    (same values and gradients; dropout masks are replayed): much less memory for about a third more encoder work.
    ``autocast=False``: BERT computes in float32 even inside an autocast region (its matmuls then follow
    ``torch.backends.cuda.matmul.allow_tf32``). Under autocast every BERT weight and bias is cast to the low
    precision on every step, a kernel each way (forward and backward): about 520 of a training step's ~3,050
    operations at the MOSI shape (benchmarks/step_census.py).
    ``cast_once=True`` (used under autocast, without ``checkpoint``): the Linear layers' weights and biases are
    cast together, in one concatenated tensor, and BERT runs on slices of it (``cast_linear_weights``): the same
    values and gradients as autocast's casts, in a few kernels instead of ~290 per training step. Superseded by the
    trainer's ``reuse_weight_casts`` (``nn.weight_casts``: every Linear, once per optimizer step); when that has
    cast the weights already, this does nothing.
    ``fused_qkv=True`` (without ``checkpoint``): a BertModel's layers run through ``nn.fused_bert``, one matmul for
    queries, keys and values and no pooler: the same outputs and gradients, ~240 fewer operations per training
    step for bert-base. Other encoders (``fused_bert.unsupported``) keep transformers' forward.
    """

    def __init__(self, pretrained: str, *, finetune: bool = True, checkpoint: bool = False,
                 autocast: bool = True, cast_once: bool = False, fused_qkv: bool = False) -> None:
        super().__init__()
        self.bert = load_pretrained_encoder(pretrained)
        self.finetune, self.autocast, self.checkpoint = finetune, autocast, checkpoint
        self.cast_once = cast_once and not checkpoint  # a recomputed layer would run on the float32 weights
        why_not = "checkpoint_encoder recomputes transformers' layers" if checkpoint else unsupported(self.bert)
        if fused_qkv and why_not:
            logger.info(f"encoder_fused_qkv: '{pretrained}' keeps transformers' forward ({why_not})")
        self.fused_qkv = fused_qkv and not why_not
        self._linears = linear_slots([self.bert])
        if getattr(self.bert, "pooler", None) is not None:
            self.bert.pooler.requires_grad_(False)
        if not finetune:
            self.bert.requires_grad_(False)
        replace_dropouts(self.bert)  # the same dropout, its CPU mask drawn 4x faster (nn.dropout)
        if checkpoint:
            enable_activation_checkpointing(self.bert, pretrained)

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def joined_slots(self) -> list[list[Slot]]:
        """The weight families the fused layers read as one tensor (none with transformers' forward)."""
        return joined_slots(self.bert) if self.fused_qkv else []

    def attention_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """(b, l) 0/1 padding mask -> what BERT is given. For a BertModel with SDPA attention (transformers >= 5,
        which passes 4-D masks through as they are) the additive bias (b, 1, 1, l) in the attention's ``dtype``,
        0 at valid keys and -inf at padding: what PyTorch would make of a boolean mask in each of BERT's layers
        (2 kernels per layer on CUDA, 4 at a length that is not a multiple of 8), made once. From the 2-D mask
        transformers would first ask ``mask.all()`` to see whether it can drop the mask, a host synchronisation on
        CUDA. Other encoders and attention implementations get the 2-D mask as before."""
        if self.fused_qkv or (READY_MADE_MASKS and isinstance(self.bert, transformers.BertModel)
                              and getattr(self.bert.config, "_attn_implementation", None) == "sdpa"):
            return additive_mask(mask[:, None, None, :], dtype)  # (b, 1, 1, l)
        return mask

    def attention_dtype(self) -> torch.dtype:
        """The dtype of BERT's queries (``sdpa.query_dtype``; its weights' when BERT is kept out of autocast)."""
        weight = self.bert.get_input_embeddings().weight
        return query_dtype(weight) if self.autocast else weight.dtype

    def forward(self, text: Tensor) -> Tensor:
        ids, mask, segments = text[:, 0].long(), text[:, 1].long(), text[:, 2].long()  # 3 x (b, l)
        kind = text.device.type
        inputs = {"input_ids": ids, "attention_mask": self.attention_mask(mask, self.attention_dtype()),
                  "token_type_ids": segments}
        in_float32 = torch.autocast(kind, enabled=False) if not self.autocast else nullcontext()
        # BERT's SDPA attention picks among the fusion's kernels; not when its layers are recomputed in backward,
        # outside this block, where another kernel would draw other dropout masks
        kernels = sdpa_kernel(fused_backends(text.device)) if not self.checkpoint else nullcontext()
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()), in_float32, kernels:
            cast = (self.cast_once and torch.is_autocast_enabled(kind)  # not if already cast (ReusedCasts)
                    and self._linears[0][0].weight.dtype == torch.float32)
            weights = cast_linear_weights([getattr(m, attr) for m, attr in self._linears],
                                          torch.get_autocast_dtype(kind)) if cast else []
            with substituted(self._linears if cast else [], weights):
                if self.fused_qkv:
                    return fused_forward(self.bert, ids, segments, inputs["attention_mask"])  # (b, l, e)
                return self.bert(**inputs).last_hidden_state  # (b, l, e)


def enable_activation_checkpointing(model: nn.Module, pretrained: str) -> None:
    """Layer-wise activation checkpointing through the transformers API (non-reentrant, so frozen inputs work)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"checkpoint_encoder=true, but the encoder '{pretrained}' ({type(model).__name__}) does not "
                         "support activation checkpointing; set checkpoint_encoder to false")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(b,) lengths -> (b, max_len) bool mask, True at valid steps."""
    return torch.arange(max_len, device=lengths.device)[None] < lengths[:, None]


class SequenceEncoder(nn.Module):
    """Unidirectional LSTM over the true lengths, then one Linear to ``out_dim``.

    Returns the local sequence (every frame's output through the Linear, cut to the longest length in the batch,
    zero before the Linear at padded steps) and the utterance vector (the last layer's state at each sequence's
    last valid step, through dropout and the same Linear).

    ``packed=True`` runs the LSTM over a packed sequence, as the authors; ``packed=False`` runs it over the padded
    batch and reads each sequence's last valid step. A forward recurrence never looks ahead, so both give the same
    outputs, states and gradients; the padded run is one fused cuDNN/oneDNN call instead of one small step per
    frame: 20x faster on an H100 and on 2 CPU cores for MOSI's 375-500 frames (benchmarks/bench_lstm.py).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_layers: int = 1,
                 dropout: float = 0.0, packed: bool = True) -> None:
        super().__init__()
        self.rnn = nn.LSTM(in_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                           dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = Dropout(dropout)
        self.proj = nn.Linear(hidden_dim, out_dim) if hidden_dim != out_dim else nn.Identity()
        self.packed = packed

    def forward(self, x: Tensor, lengths: Tensor, on_device: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (b, t, f); lengths (b,) on the CPU, each >= 1; ``on_device``: the same lengths on x's device, when the
        caller has them already (else copied here).

        The recurrence runs in float32 even under autocast: CUDA autocast would hand cuDNN's LSTM float16 whatever
        the autocast dtype (seen in a bf16 profile), and these LSTMs are too small for it to pay.
        """
        with torch.autocast(x.device.type, enabled=False):
            local, last = self._recurrence(x.to(self.rnn.weight_ih_l0.dtype), lengths, on_device)
        return self.proj(local), self.proj(self.dropout(last))

    def _recurrence(self, x: Tensor, lengths: Tensor, on_device: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-step outputs (b, max(lengths), e), zero at padded steps, and the state at the last valid step."""
        if self.packed:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            outputs, (h_n, _) = self.rnn(packed)
            local, _ = pad_packed_sequence(outputs, batch_first=True)  # (b, max(lengths), e), zero-padded
            last = h_n[-1]  # (b, e)
        else:
            steps = int(lengths.max())
            local, _ = self.rnn(x[:, :steps])  # (b, max(lengths), e)
            lengths = to_device(lengths, x.device) if on_device is None else on_device  # no host sync
            last = local[torch.arange(len(local), device=x.device), lengths - 1]  # (b, e)
            valid = length_mask(lengths, steps)  # (b, max(lengths))
            local = local * valid[..., None].to(local.dtype)
        return local, last
