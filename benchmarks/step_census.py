"""What one training step of each mode launches and keeps, counted on any device (no GPU needed, no timing).

    python benchmarks/step_census.py [--shape mosi] [--as-device cuda|cpu] [--modes fast fast-nostack ...]

On a GPU a step of this model is bound by kernel launches, not arithmetic (``bench_train.py --profile``: the card
was busy 5-13 % of the step), and its peak memory is the weights, gradients and Adam states plus the activations
kept for the backward pass. Both can be counted exactly without the card. For each mode of ``bench_train.MODES``
(``auto`` switches resolved as on ``--as-device``), one accumulation group of training steps on one full-length
batch of the shape (bert-base-sized encoder with random weights, both views, every loss) is run here and counted:

* ATen operations (non-view) in the forward pass per part, the backward pass and the optimizer step, per
  mini-batch of an accumulation group of 4 (the authors' ``update_epochs``), as ``train_one_epoch`` runs it: each
  is at least one kernel launch on a GPU (a packed cuDNN LSTM, one operation here, launches kernels per frame
  there);
* bytes of the tensors saved for backward (unique storages, parameters excluded; bf16 autocast copies of weights
  included), the activation memory of the step;
* static bytes: fp32 parameters, plus a gradient and two Adam moments for every trainable one;
* their sum, the step's predicted peak. Transients of the backward pass come on top: for the fast modes without
  the fusion's recomputation (modalities one call each / stacked along the batch) the H100 measured 4.17 and
  5.31 GiB where this predicts 4.11 and 4.99; for the baseline, whose explicit T x T attention matrices make
  large transients, 8.91 against 7.84.

With ``--as-device cuda`` the attention (the fusion's and BERT's) runs through PyTorch's fused kernel with the
dropout switched off, as it runs on a GPU (the CPU's chunked dropout kernel, or for BERT the unfused math path,
would count their own operations instead); dropout is an argument of the GPU kernel, not extra launches. The
other dropouts run through torch's kernel, not the numpy masks of ``mmsa_emt.fast.dropout`` (CPU only); on the CPU
that kernel is 3 operations, on a GPU 1.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import torch
from bench_train import MODES, SHAPES, OpCensus, make_batches, setup
from workspace import bert_base

from mmsa_emt import LossWeights, compute_loss
from mmsa_emt.fast.dropout import use_numpy_dropout


def count_step(model, optimizer, speed, batch, weights, update_every: int = 4) -> tuple[collections.Counter, int]:
    """One accumulation group as ``train_one_epoch`` runs it (``update_every`` mini-batches, then the optimizer
    step): its operation counts per phase, per
    mini-batch, and the largest bytes of activations a mini-batch saved for backward."""
    model.train()  # as train_one_epoch: from_pretrained leaves BERT in eval mode
    counter = OpCensus()
    hooks = counter.track_parts(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    most = 0
    with counter:
        for _ in range(update_every):
            saved: dict[int, int] = {}

            def keep(t: torch.Tensor, saved=saved) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage.data_ptr() not in params:
                    saved[storage.data_ptr()] = storage.nbytes()
                return t

            counter.phase = "forward"
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), speed.autocast("cpu"):
                loss = compute_loss(model, batch, weights).total
            counter.phase = "backward"
            loss.backward()
            most = max(most, sum(saved.values()))
        counter.phase = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for hook in hooks:
        hook.remove()
    return collections.Counter({k: round(v / update_every) for k, v in counter.counts.items()}), most


def census(shape: str, mode: str, encoder: str, as_device: str, quick: bool = False) -> dict:
    model, optimizer, speed = setup(shape, mode, "cpu", encoder, as_device=as_device,
                                    attn_dropout=0.0 if as_device == "cuda" else 0.3)
    if as_device == "cuda":
        use_numpy_dropout(model, False)  # as on a GPU: torch's dropout kernel
    if as_device == "cuda":  # BERT's attention too: with dropout the CPU takes SDPA's unfused math path
        for attention in (m for m in model.modules() if hasattr(m, "attention_head_size")):
            attention.dropout.p = 0.0
    batch = speed.prepare(make_batches(SHAPES[shape], 1, quick, encoder)[0], "cpu")
    count_step(model, optimizer, speed, batch, LossWeights(), 1)  # the first step creates Adam's state
    ops, saved = count_step(model, optimizer, speed, batch, LossWeights())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = 4 * (sum(p.numel() for p in model.parameters()) + 3 * trainable)  # fp32: grad + two Adam moments
    return {"mode": mode, "precision": speed.precision, "ops": dict(ops), "activations_gib": saved / 2**30,
            "static_gib": static / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mosi", choices=sorted(SHAPES))
    parser.add_argument("--as-device", default="cuda", choices=["cuda", "cpu"],
                        help="resolve 'auto' switches and pick the attention path as on this device")
    parser.add_argument("--modes", nargs="+", default=["baseline", "fast-nostack",
                                                       "fast-nocheckpoint", "fast"], choices=list(MODES))
    parser.add_argument("--quick", action="store_true", help="audio and vision cut to a quarter of their length "
                        "(as bench_train.py --quick); the text encoder's counts are those of the full shape")
    args = parser.parse_args()
    cut = " (audio/vision cut to a quarter)" if args.quick else ""
    print(f"{args.shape} shape{cut}, switches as on {args.as_device}, counted on the CPU per mini-batch of an "
          "accumulation group of 4")
    print(f"{'mode':18s} {'prec':5s} {'ops':>6s} {'fwd':>5s} {'bwd':>5s} {'optim':>5s}  "
          f"{'text':>4s} {'lstm':>4s} {'fusion':>6s} {'other':>5s}  {'activ.':>7s} {'static':>7s} {'peak':>7s}")
    with tempfile.TemporaryDirectory() as folder:
        encoder = bert_base(Path(folder) / "bert-base")
        for mode in dict.fromkeys(args.modes):
            r = census(args.shape, mode, encoder, args.as_device, args.quick)
            ops = r["ops"]
            forward = {k.split(":", 1)[1]: v for k, v in ops.items() if k.startswith("forward:")}
            lstm = forward.get("audio_encoder", 0) + forward.get("vision_encoder", 0)
            other = sum(forward.values()) - lstm - forward.get("text_encoder", 0) - forward.get("emt", 0)
            print(f"{mode:18s} {r['precision']:5s} {sum(ops.values()):6d} {sum(forward.values()):5d} "
                  f"{ops.get('backward', 0):5d} {ops.get('optimizer', 0):5d}  {forward.get('text_encoder', 0):4d} "
                  f"{lstm:4d} {forward.get('emt', 0):6d} {other:5d}  {r['activations_gib']:6.2f}G "
                  f"{r['static_gib']:6.2f}G {r['activations_gib'] + r['static_gib']:6.2f}G", flush=True)


if __name__ == "__main__":
    main()
