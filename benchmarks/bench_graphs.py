"""How fast could a training step be as a CUDA graph? An experiment, not a shipped path (CUDA only).

    python benchmarks/bench_graphs.py [--shape mosi] [--steps 8] [--repeats 3] [--quick] [--device cuda|cpu]
                                      [--out saved_results/bench_graphs.json]

A training step of the shipped CUDA config launches ~2,600 operations and keeps the GPU busy ~13 % of the time
(``bench_train.py --profile``): the host's cost per launch sets the pace. Replaying the forward and backward of the
whole loss as one CUDA graph (``torch.cuda.make_graphed_callables``) removes that cost; what is left is the GPU's
own time. This script measures both on one full-length batch of the dataset's shape (bert-base-sized encoder,
random weights), padding not trimmed so that every step has the same shapes, as a graph requires:

* ``eager``: the shipped config (``bench_train``'s ``fast`` with ``trim_padding`` off), forward + backward +
  fused Adam, the way ``train_one_epoch`` runs it, but with an optimizer step after every batch;
* ``graph``: the same network, its forward and backward (both views, every loss) captured once and replayed;
  the optimizer step runs eagerly after it. Captured under bf16 autocast with its weight cache off, as capture
  requires;
* ``graph, no recomputation``: the same with ``checkpoint_fusion`` off, in case the recomputation (which stashes
  and restores the RNG state) cannot be captured.

Sequence lengths stay on the host for the LSTMs (``int(lengths.max())``); their device copies are made once
before the capture and served from a cache keyed by value, since pinned-memory copies cannot be captured. The
batch is the same at every replay (a real loop would copy each batch into the graph's static inputs, which
``make_graphed_callables`` does). A variant that fails to capture prints its error and the others go on.

Printed per variant: ms per step (median of ``--repeats`` passes of ``--steps`` steps after warm-up),
samples/s, peak CUDA memory and the first step's loss; the ratio against ``eager``. ``--quick`` cuts the
audio/vision sequences to a quarter; ``--device cpu`` runs ``eager`` alone (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train import SHAPES, make_batches, setup
from torch import Tensor, nn
from workspace import bert_base

import mmsa_emt.fast.encoders
import mmsa_emt.fast.views
from mmsa_emt import LossWeights, compute_loss
from mmsa_emt.dlfr import TwoViewBatch


class LengthsOnDevice:
    """``to_device`` for the model's length tensors, served from copies made before the capture."""

    def __init__(self, original) -> None:
        self.original, self.cache = original, {}

    def __call__(self, tensor: Tensor, device) -> Tensor:
        if tensor.device.type != "cpu":
            return self.original(tensor, device)
        key = (tuple(tensor.tolist()), str(device))
        if key not in self.cache:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("lengths not seen before the capture")
            self.cache[key] = self.original(tensor, device)
        return self.cache[key]


class LossStep(nn.Module):
    """The loss of one batch as a module of tensors only (what make_graphed_callables takes)."""

    def __init__(self, model: nn.Module, audio_lengths: Tensor, vision_lengths: Tensor) -> None:
        super().__init__()
        self.model, self.audio_lengths, self.vision_lengths = model, audio_lengths, vision_lengths

    def forward(self, text, text_m, audio, audio_m, vision, vision_m, text_dropped, audio_dropped, vision_dropped,
                labels) -> tuple[Tensor, Tensor]:
        batch = TwoViewBatch(text=text, text_m=text_m, audio=audio, audio_m=audio_m, vision=vision,
                             vision_m=vision_m, audio_lengths=self.audio_lengths, vision_lengths=self.vision_lengths,
                             text_dropped=text_dropped, audio_dropped=audio_dropped, vision_dropped=vision_dropped,
                             labels=labels)
        kind = text.device.type
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda", cache_enabled=False):
            out = compute_loss(self.model, batch, LossWeights())
        return out.total, out.pred.detach()


TENSORS = ("text", "text_m", "audio", "audio_m", "vision", "vision_m", "text_dropped", "audio_dropped",
           "vision_dropped", "labels")


def measure(name: str, shape: str, encoder: str, batch: TwoViewBatch, device: str, *, graph: bool,
            recompute: bool, steps: int, repeats: int) -> dict:
    on_cuda = device == "cuda"
    model, optimizer, _ = setup(shape, "fast" if recompute else "fast-nocheckpoint", device, encoder)
    args = tuple(getattr(batch, k) for k in TENSORS)
    step_module = LossStep(model, batch.audio_lengths, batch.vision_lengths).train()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    if graph:
        for _ in range(2):  # eager steps first: cuDNN/cuBLAS plans, the lengths' device copies
            step_module(*args)[0].backward()
        optimizer.zero_grad(set_to_none=True)
        step_module = torch.cuda.make_graphed_callables(step_module, args, allow_unused_input=True)

    def step() -> Tensor:
        loss = step_module(*args)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first_loss = step().item()
    for _ in range(2):
        step()
    times = []
    sync = torch.cuda.synchronize if on_cuda else lambda: None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - start) / steps)
    ms = statistics.median(times) * 1e3
    b = batch.labels.numel()
    return {"variant": name, "ms": ms, "spread_ms": (max(times) - min(times)) * 1e3, "samples_s": b / ms * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan"),
            "first_loss": first_loss, "card": torch.cuda.get_device_name() if on_cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mosi", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="audio/vision sequences cut to a quarter")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="saved_results/bench_graphs.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_graphs.py needs a CUDA device (--device cpu runs the eager variant alone)")
    lengths = LengthsOnDevice(mmsa_emt.fast.encoders.to_device)
    mmsa_emt.fast.encoders.to_device = mmsa_emt.fast.views.to_device = lengths
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        encoder = bert_base(Path(folder) / "bert-base")
        batch = make_batches(SHAPES[args.shape], 1, args.quick, encoder)[0].to(args.device)  # full padding
        variants = {"eager": (False, True), "graph": (True, True), "graph, no recomputation": (True, False)}
        for name, (graph, recompute) in variants.items():
            if graph and args.device != "cuda":
                continue
            try:
                row = measure(name, args.shape, encoder, batch, args.device, graph=graph, recompute=recompute,
                              steps=args.steps, repeats=args.repeats)
            except Exception as error:  # an experiment: report the failure, go on with the next variant
                print(f"{name}: failed: {error!r}"[:2000], flush=True)
                continue
            rows.append(row)
            ratio = rows[0]["ms"] / row["ms"] if rows[0]["variant"] == "eager" else float("nan")
            print(f"{name:24s} {row['ms']:7.1f} ms/step (spread {row['spread_ms']:.1f}) {row['samples_s']:7.1f} "
                  f"samples/s | x{ratio:.2f} eager | peak {row['peak_gib']:.2f} GiB | first loss "
                  f"{row['first_loss']:.4f} | {row['card']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
