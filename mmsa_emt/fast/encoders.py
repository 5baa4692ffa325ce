"""The unimodal encoders computed with fewer kernels: the same function as ``nn.encoders``, the same parameters and
state-dict keys. ``apply`` swaps these classes in.

- ``FastBertTextEncoder``: BERT's layers with one query/key/value matmul (``encoder_fused_qkv``, ``fused_bert``),
  its attention mask made once as an additive bias, cuDNN's attention kernel left out; optionally each layer
  recomputed in the backward pass (``checkpoint_encoder``).
- ``PaddedSequenceEncoder``: the LSTM over the padded batch (``packed_lstm: false``), one fused cuDNN/oneDNN call.

Shape legend: b batch, l text tokens, t frames, f input features, e hidden width.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import transformers
from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel

from ..nn.encoders import BertTextEncoder, SequenceEncoder, length_mask
from .fused_bert import fused_forward, unsupported
from .sdpa import additive_mask, fused_backends, query_dtype
from .transfer import to_device

logger = logging.getLogger(__name__)
READY_MADE_MASKS = int(transformers.__version__.split(".")[0]) >= 5  # 4-D masks are passed through as they are


class FastBertTextEncoder(BertTextEncoder):
    """``nn.encoders.BertTextEncoder`` run the fast way; ``configure`` sets how.

    ``checkpoint``: in training, each layer's activations are recomputed in the backward pass instead of kept
    (same values and gradients; dropout masks are replayed): less memory for about a third more encoder work.
    ``fused_qkv`` (without ``checkpoint``): a BertModel's layers run through ``fused_bert``, one matmul for queries,
    keys and values and no pooler: the same outputs and gradients. Other encoders (``fused_bert.unsupported``) keep
    transformers' forward.
    """

    fused_qkv: bool = False
    checkpoint: bool = False

    def configure(self, *, fused_qkv: bool, checkpoint: bool) -> None:
        why_not = "checkpoint_encoder recomputes transformers' layers" if checkpoint else unsupported(self.bert)
        if fused_qkv and why_not:
            logger.info(f"encoder_fused_qkv: '{self.pretrained}' keeps transformers' forward ({why_not})")
        self.fused_qkv = fused_qkv and not why_not
        if checkpoint != self.checkpoint:
            set_activation_checkpointing(self.bert, self.pretrained, checkpoint)
        self.checkpoint = checkpoint

    def attention_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """(b, l) 0/1 padding mask -> what BERT is given. For a BertModel with SDPA attention (transformers >= 5,
        which passes 4-D masks through as they are) the additive bias (b, 1, 1, l) in the attention's ``dtype``,
        0 at valid keys and -inf at padding: what PyTorch would make of a boolean mask in each of BERT's layers
        (2 kernels per layer on CUDA, 4 at a length that is not a multiple of 8), made once. From the 2-D mask
        transformers would first ask ``mask.all()`` to see whether it can drop the mask, a host synchronisation on
        CUDA. Other encoders and attention implementations get the 2-D mask."""
        if self.fused_qkv or (READY_MADE_MASKS and isinstance(self.bert, transformers.BertModel)
                              and getattr(self.bert.config, "_attn_implementation", None) == "sdpa"):
            return additive_mask(mask[:, None, None, :], dtype)  # (b, 1, 1, l)
        return mask

    def forward(self, text: Tensor) -> Tensor:
        ids, mask, segments = text[:, 0].long(), text[:, 1].long(), text[:, 2].long()  # 3 x (b, l)
        bias = self.attention_mask(mask, query_dtype(self.bert.get_input_embeddings().weight))
        # BERT's SDPA attention picks among the fusion's kernels; not when its layers are recomputed in backward,
        # outside this block, where another kernel would draw other dropout masks
        kernels = sdpa_kernel(fused_backends(text.device)) if not self.checkpoint else nullcontext()
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()), kernels:
            if self.fused_qkv:
                return fused_forward(self.bert, ids, segments, bias)  # (b, l, e)
            return self.bert(input_ids=ids, attention_mask=bias, token_type_ids=segments).last_hidden_state


def set_activation_checkpointing(model: nn.Module, pretrained: str, on: bool) -> None:
    """Layer-wise activation checkpointing through the transformers API (non-reentrant, so frozen inputs work)."""
    if not on:
        model.gradient_checkpointing_disable()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"checkpoint_encoder=true, but the encoder '{pretrained}' ({type(model).__name__}) does not "
                         "support activation checkpointing; set checkpoint_encoder to false")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class PaddedSequenceEncoder(SequenceEncoder):
    """``nn.encoders.SequenceEncoder`` with the LSTM run over the padded batch, each sequence's last valid step read
    after. A forward recurrence never looks ahead, so this gives the packed run's outputs, states and gradients, in
    one fused cuDNN/oneDNN call instead of one small step per frame.

    ``forward`` also takes the lengths already on x's device (``on_device``), when the caller has them.
    """

    def forward(self, x: Tensor, lengths: Tensor, on_device: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (b, t, f); lengths (b,) on the CPU, each >= 1; ``on_device``: the same lengths on x's device, when the
        caller has them already (else copied here). In float32, as ``SequenceEncoder.forward``."""
        with torch.autocast(x.device.type, enabled=False):
            local, last = self.padded_recurrence(x.to(self.rnn.weight_ih_l0.dtype), lengths, on_device)
        return self.proj(local), self.proj(self.dropout(last))

    def padded_recurrence(self, x: Tensor, lengths: Tensor, on_device: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-step outputs (b, max(lengths), e), zero at padded steps, and the state at the last valid step."""
        steps = int(lengths.max())  # CPU lengths: no host sync
        local, _ = self.rnn(x[:, :steps])  # (b, max(lengths), e)
        lengths = to_device(lengths, x.device) if on_device is None else on_device  # no host sync
        last = local[torch.arange(len(local), device=x.device), lengths - 1]  # (b, e)
        return local * length_mask(lengths, steps)[..., None].to(local.dtype), last
