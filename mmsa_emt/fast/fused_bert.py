"""transformers' BertModel run layer by layer with one query/key/value projection: the same maths, fewer kernels.

A ``BertLayer`` projects queries, keys and values with three Linears. Under autocast each of them casts its weight,
its bias and its (shared) float32 input on its own, and the backward pass does all of that three times again and
sums the three input gradients. Here the three weights are concatenated, so a layer does one matmul for all three
and one cast of its input: ~20 fewer kernel launches per layer and training step (~240 for bert-base), which is
what a GPU step of this model is bound by (``benchmarks/step_census.py``). The layers are called directly, without
transformers' per-call wrappers, and the pooler, whose output EMT-DLFR never reads, is not run.

Everything else is BertModel's own: the embeddings module, the parameters (names, state dict), the dropout
modules, called in the same order with the same shapes, so a seed gives the same masks, and the attention, through
the same ``scaled_dot_product_attention`` call transformers' SDPA attention makes. ``unsupported`` says which
encoders this cannot run (they keep transformers' forward).

Shape legend: b batch, l tokens, h heads, d head width, e hidden width.
"""

from __future__ import annotations

import torch
import transformers
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F


def unsupported(bert: nn.Module) -> str | None:
    """Why ``fused_forward`` cannot run this encoder, or None when it can."""
    if not isinstance(bert, transformers.BertModel):
        return f"{type(bert).__name__} is not a BertModel"
    config = bert.config
    if config.is_decoder or getattr(config, "add_cross_attention", False):
        return "a decoder (causal attention, cross-attention)"
    if getattr(config, "chunk_size_feed_forward", 0):
        return "chunk_size_feed_forward is set (its dropout masks are drawn per chunk)"
    if any(getattr(layer.attention.self, "position_embedding_type", "absolute") != "absolute"
           for layer in bert.encoder.layer):
        return "relative position embeddings in the attention"
    return None


def fused_forward(bert: transformers.BertModel, ids: Tensor, token_types: Tensor, bias: Tensor) -> Tensor:
    """BertModel's ``last_hidden_state`` for ids and token types (b, l) and the additive attention bias
    (b, 1, 1, l): 0 at tokens to attend to, -inf at padding, in the queries' dtype."""
    x = bert.embeddings(input_ids=ids, token_type_ids=token_types)  # (b, l, e)
    for layer in bert.encoder.layer:
        x = bert_layer(layer, x, bias)
    return x


def bert_layer(layer: nn.Module, x: Tensor, bias: Tensor) -> Tensor:
    """One ``BertLayer`` (post-LayerNorm): self-attention, Add & Norm, feed-forward, Add & Norm; x (b, l, e)."""
    attention, out = layer.attention.self, layer.attention.output
    projections = (attention.query, attention.key, attention.value)
    weight = torch.cat([linear.weight for linear in projections])  # (3e, e)
    qkv_bias = torch.cat([linear.bias for linear in projections])  # (3e,)
    qkv = rearrange(F.linear(x, weight, qkv_bias), "b l (three h d) -> b l three h d", three=3,
                    h=attention.num_attention_heads)  # a view
    # unbound along its own axis: the backward stacks the three gradients back into (b, l, 3, h, d), which reads as
    # (b, l, 3e) without a copy (unbound along a leading axis, it needs a stack, a copy and a view per layer)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # 3 x (b, h, l, d), views
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=attention.dropout.p if attention.training else 0.0,
                                           scale=getattr(attention, "scaling", None))  # (b, h, l, d)
    context = rearrange(heads, "b h l d -> b l (h d)")  # (b, l, e)
    x = out.LayerNorm(out.dropout(out.dense(context)) + x)
    return layer.output(layer.intermediate(x), x)  # dense, activation, dense, dropout, Add & Norm
