"""Low-precision copies of Linear weights, made in one conversion and reused until the optimizer changes them.

Under autocast every Linear casts its float32 weight and bias to bf16/fp16 at each forward pass (a kernel each),
and the backward pass casts each of their gradients back (another). Yet with gradient accumulation (the authors
step Adam every 4 mini-batches) the weights stay the same over 4 forward passes, and over a whole evaluation.
``ReusedCasts`` casts them a group at a time (a concatenation and a conversion per ~8 M weights), lets the model
read the copies (its parameters are swapped for them within ``applied``) and keeps them until ``refresh``, which
the trainer calls after each optimizer step. The gradients flow back through the same concatenations into one
float32 buffer per group (``FlatGradients``): one kernel per group and backward pass. The rounding and the float32
additions are autocast's and autograd's, so the values and gradients are the same, bit for bit.

The small float32 parameters around them (LayerNorm, BatchNorm, small embeddings: ~70 in a bert-base model) need no
cast, but autograd accumulates each of their gradients on its own (an ``add_`` each, mini-batches 2 to 4 of an
accumulation group). ``ReusedCasts`` gathers them too (``gathered``): float32 views of one concatenation per group,
their gradients added to one flat buffer, the same float32 sums.

Weights that a layer reads as one tensor (``joined`` families: BERT's query, key and value weights, and their
biases, for ``fast.fused_bert``) are cast side by side as one piece, which ``joined`` hands out within ``applied``:
no concatenation at every forward pass, and no second copy of them kept for the backward pass.

The trainer (``SpeedConfig.reuse_weight_casts``) keeps one ``ReusedCasts`` per epoch or evaluation only:
nothing outside its loop can change the weights while the copies are in use. (Parameter version counters cannot
tell: a fused Adam step does not bump them.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

Slot = tuple[nn.Module, str]  # (module, parameter name), e.g. (linear, "weight")
# within ReusedCasts.applied: id of a joined family's first copy -> (the family's piece, ids of all its copies)
_PIECES: ContextVar[dict[int, tuple[Tensor, list[int]]] | None] = ContextVar("reused_cast_pieces", default=None)


def joined(tensors: list[Tensor]) -> Tensor:
    """The tensors concatenated along dim 0. Copies that ``ReusedCasts`` cast side by side as one piece (a
    ``joined`` family, in order) are that piece: no concatenation, no extra copy."""
    pieces = None if torch.compiler.is_compiling() else _PIECES.get()
    piece = None if pieces is None else pieces.get(id(tensors[0]))
    if piece is not None and piece[1] == [id(t) for t in tensors]:
        return piece[0]
    return torch.cat(tensors)


def linear_slots(modules: list[nn.Module]) -> list[Slot]:
    """The weight and bias slots of every ``nn.Linear`` inside ``modules`` (each once)."""
    linears = dict.fromkeys(m for module in modules for m in module.modules() if isinstance(m, nn.Linear))
    return [(m, kind) for m in linears for kind in ("weight", "bias") if getattr(m, kind) is not None]


GATHERED_KINDS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)  # they read ``self.weight`` per call


def norm_slots(modules: list[nn.Module], *, largest: int = 2**20) -> list[Slot]:
    """The weight and bias slots of every LayerNorm, BatchNorm and Embedding inside ``modules`` (each once) with at
    most ``largest`` elements: a vocabulary's embedding table (bert-base: 23 M) is left out, a copy of it would
    cost memory for one ``add_``; so is an Embedding with ``max_norm``, which renormalises its table in place. (An
    LSTM keeps its own list of its weights: swapping them would not reach it.)"""
    kinds = dict.fromkeys(m for module in modules for m in module.modules()
                          if isinstance(m, GATHERED_KINDS) and getattr(m, "max_norm", None) is None)
    return [(m, kind) for m in kinds for kind in ("weight", "bias")
            if isinstance(getattr(m, kind, None), nn.Parameter) and getattr(m, kind).numel() <= largest]


def low_precision_slots(model: nn.Module) -> list[Slot]:
    """The weights and biases autocast casts in a forward pass of ``model``: those of every Linear."""
    return linear_slots([model])


def gathered_slots(model: nn.Module) -> list[Slot]:
    """The float32 parameters whose gradients ``ReusedCasts`` accumulates in flat buffers with the Linear weights':
    those of the LayerNorms, BatchNorms and small embeddings (``norm_slots``)."""
    return norm_slots([model])


@contextmanager
def substituted(slots: list[Slot], tensors: list[Tensor]) -> Iterator[None]:
    """Within the block, each module's parameter ``attr`` reads as the given tensor; restored after, whatever
    happens. (torch.func.functional_call does the same but walks the whole module on every call, adding Python
    time to every BERT forward on a path whose point is to save host time.)"""
    saved = [(module, attr, module._parameters[attr]) for module, attr in slots]
    try:
        for (module, attr), tensor in zip(slots, tensors):
            module._parameters[attr] = tensor
        yield
    finally:
        for module, attr, parameter in saved:
            module._parameters[attr] = parameter


def cast_linear_weights(weights: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """The tensors cast to ``dtype`` through one concatenation: views of one low-precision copy.

    Autocast casts each Linear's weight and bias on its own (a kernel each, forward and backward); here the cast
    is one concatenation and one conversion, and the backward one concatenation of the gradients and one
    conversion back. The rounding is the same, so are the values and the gradients.
    """
    return split_as(concatenated(weights, dtype), weights)


class FlatGradients:
    """Where the gradients of a group of parameters cast together go: one float32 buffer, whose views are the
    parameters' ``.grad``, to which each backward pass adds the low-precision flat gradient in one kernel (autograd
    would cast each parameter's gradient back and accumulate it, two kernels per parameter). The same float32
    additions in the same order, so the same gradients, bit for bit.

    If some ``.grad`` is not one of its views (the optimizer left zeros in place of None, or another path
    accumulated into it first), it adds per parameter instead, as autograd would. One difference: a weight of a
    group that a pass does not use gets a zero gradient, where autograd would leave ``.grad`` None (and Adam would
    skip it). Every weight of EMT-DLFR is used in every training pass (tests/test_model.py checks that each
    trainable parameter gets a gradient).
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.flat: Tensor | None = None  # (sum of sizes,) float32: the gradients, once the first pass is in
        self.views: list[Tensor] = []

    def accumulate(self, grad: Tensor) -> None:
        """grad: (sum of sizes,) in the dtype of the concatenation (low precision; float32 for gathered ones)."""
        if self.flat is not None and all(p.grad is v for p, v in zip(self.params, self.views)):
            self.flat.add_(grad)  # float32 += low precision, one kernel
        elif all(p.grad is None for p in self.params):
            # a new tensor (grad, if already float32: the concatenation split_as's backward made, not shared)
            self.flat = grad.to(self.params[0].dtype)
            self.views = split_as(self.flat, self.params)
            for p, view in zip(self.params, self.views):
                p.grad = view
        else:
            self.flat, self.views = None, []
            for p, piece in zip(self.params, split_as(grad, self.params)):
                if p.grad is None:
                    p.grad = piece.to(p.dtype)
                else:
                    p.grad.add_(piece)


def concatenated(weights: list[Tensor], dtype: torch.dtype, *, marked: bool = False) -> Tensor:
    """The tensors flattened, concatenated and cast to ``dtype``: (sum of sizes,).

    ``marked`` (for a copy made without autograd, e.g. for an evaluation): the copy is flagged as requiring grad,
    as the parameters are. PyTorch's matmul folds a batch of non-contiguous inputs into one matrix product only
    for a weight that requires grad; for one that does not, it expands the weight into a batched product (seen
    as 2x slower evaluation on this CPU).
    """
    flat = torch.cat([w.reshape(-1) for w in weights]).to(dtype)
    return flat.requires_grad_(True) if marked else flat  # a leaf without autograd: its views require grad too


def split_as(flat: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Views of ``flat`` with the sizes and shapes of ``tensors``, in order."""
    pieces = flat.split_with_sizes([t.numel() for t in tensors])
    return [piece.view(t.shape) for t, piece in zip(tensors, pieces)]


class _CastTogether(torch.autograd.Function):
    """Forward: the weights concatenated and cast, (sum of sizes,); backward: the flat gradient handed to the
    ``FlatGradients`` of these weights, nothing returned to autograd's per-parameter accumulation."""

    @staticmethod
    def forward(ctx, sink: FlatGradients, dtype: torch.dtype, *weights: Tensor) -> Tensor:
        ctx.sink, ctx.inputs = sink, len(weights)
        return concatenated(weights, dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.sink.accumulate(grad)
        return (None, None) + (None,) * ctx.inputs


class ReusedCasts:
    """The low-precision copies of ``slots`` for autocast's dtype, made at the first ``applied`` and reused until
    ``refresh``. Trainable and frozen weights are cast apart (no gradient is computed for frozen ones), per device
    and dtype, and in consecutive groups of at most ``group_size`` elements (a bert-base layer is ~7 M).

    ``gathered``: slots read in their own dtype (``norm_slots``); in training their trainable parameters are
    replaced by views of one concatenation per group, for the flat gradient buffer; otherwise left alone.
    ``joined``: families of slots (e.g. a layer's query, key and value weights) cast side by side, in one group,
    as one piece that ``joined`` returns (its rows stacked; the members' copies are views of it).

    The trainable copies' gradients reach the parameters' ``.grad`` through ``FlatGradients`` (in
    ``loss.backward()``; ``torch.autograd.grad`` would not see them), until ``refresh``. A group's gradients are
    concatenated once all of them are computed, so its bf16 gradients wait until then: groups of a layer's size
    keep that transient small (one group for a whole bert-base model raised the peak memory measurably).
    Without autocast, or without slots, ``applied`` changes nothing.
    """

    def __init__(self, slots: list[Slot], *, gathered: list[Slot] = (), joined: list[list[Slot]] = (),
                 group_size: int = 2**23) -> None:
        present = set(slots)
        families = [family for family in joined if len(family) > 1 and all(slot in present for slot in family)]
        of_family = {slot: k for k, family in enumerate(families) for slot in family}
        ordered: list[Slot] = []  # each family's slots together, in its order, where its first one was
        for slot in slots:
            if slot not in ordered:
                ordered += families[of_family[slot]] if slot in of_family else [slot]
        self.slots, self.group_size = ordered + list(gathered), group_size
        self.cast = [True] * len(ordered) + [False] * len(gathered)  # per slot: to autocast's dtype, or kept
        self.family = [of_family.get(slot) for slot in self.slots]  # per slot: its joined family, or None
        self.family_size = [len(family) for family in families]
        self.pieces: dict[int, tuple[Tensor, list[int]]] = {}
        self.copies: list[Tensor] | None = None
        self.made_for: tuple | None = None  # (dtype, grad enabled) of the copies held

    def refresh(self) -> None:
        """The weights changed (an optimizer step): the next ``applied`` casts them again."""
        self.copies = self.made_for = None
        self.pieces = {}

    @contextmanager
    def applied(self, device: torch.device | str) -> Iterator[None]:
        device_type = torch.device(device).type
        if not self.slots or not torch.is_autocast_enabled(device_type):
            yield
            return
        made_for = (torch.get_autocast_dtype(device_type), torch.is_grad_enabled())
        if made_for != self.made_for:  # copies made under no_grad carry no gradient back: remade for training
            self.copies, self.made_for = self._cast(made_for[0]), made_for
        pieces = _PIECES.set(self.pieces)
        try:
            with substituted(self.slots, self.copies):
                yield
        finally:
            _PIECES.reset(pieces)

    def _cast(self, dtype: torch.dtype) -> list[Tensor]:
        self.pieces = {}
        weights = [getattr(module, attr) for module, attr in self.slots]
        training = torch.is_grad_enabled()
        kinds: dict[tuple, list[int]] = {}
        for i, (w, cast) in enumerate(zip(weights, self.cast)):
            if w.dtype == torch.float64:  # autocast leaves float64 alone
                continue
            if cast or (training and w.requires_grad):  # gathered: only for their gradients
                kinds.setdefault((w.requires_grad, w.device, w.dtype, dtype if cast else w.dtype), []).append(i)
        copies = list(weights)
        for (trainable, _, _, target), of_kind in kinds.items():
            for members in self._consecutive_groups(of_kind, weights):
                group = [weights[i] for i in members]
                if trainable and training:
                    flat = _CastTogether.apply(FlatGradients(group), target, *group)
                else:  # no gradient computed for these copies
                    with torch.no_grad():
                        flat = concatenated(group, target, marked=trainable)
                pieces = self._pieces(members, weights)
                sizes = [sum(weights[i].numel() for i in of_piece) for of_piece in pieces]
                for piece, of_piece in zip(flat.split_with_sizes(sizes), pieces):
                    if len(of_piece) == 1:
                        copies[of_piece[0]] = piece.view(weights[of_piece[0]].shape)
                        continue
                    family = split_as(piece, [weights[i] for i in of_piece])  # read one by one elsewhere
                    for i, copy in zip(of_piece, family):
                        copies[i] = copy
                    rows = piece.view(-1, *weights[of_piece[0]].shape[1:])  # the family's rows stacked
                    self.pieces[id(family[0])] = (rows, [id(c) for c in family])
        return copies

    def _pieces(self, members: list[int], weights: list[Tensor]) -> list[list[int]]:
        """``members`` (consecutive slots of a group) cut into pieces: each whole joined family whose members have
        one trailing shape, one piece; every other slot, one of its own."""
        pieces, i = [], 0
        while i < len(members):
            family, j = self.family[members[i]], i + 1
            if family is not None:
                while j < len(members) and self.family[members[j]] == family:
                    j += 1
                trailing = {weights[k].shape[1:] for k in members[i:j]}
                if j - i != self.family_size[family] or len(trailing) != 1:
                    j = i + 1
            pieces.append(members[i:j])
            i = j
        return pieces

    def _consecutive_groups(self, members: list[int], weights: list[Tensor]) -> Iterator[list[int]]:
        """Consecutive runs of ``members`` of at most ``group_size`` elements (more where a joined family would be
        cut)."""
        group, size = [], 0
        for i in members:
            within_family = group and self.family[i] is not None and self.family[i] == self.family[group[-1]]
            if group and not within_family and size + weights[i].numel() > self.group_size:
                yield group
                group, size = [], 0
            group.append(i)
            size += weights[i].numel()
        if group:
            yield group
