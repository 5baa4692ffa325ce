"""Fusion-module scaling: EMT's global-local fusion against MulT-style pairwise local-local fusion as T grows.

    python benchmarks/bench_fusion.py [--quick] [--frames 50 100 200 500 1000 2000] [--batch 8] [--repeats 5]
                                      [--depth 2] [--device auto|cpu|cuda] [--threads N]
                                      [--out saved_results/bench_fusion]

The paper (Sun et al., arXiv 2208.07589, Sec. 3.3) argues that its Efficient Multimodal Transformer, where every
local sequence exchanges information with a global context of M tokens, scales better than MulT's crossmodal
attention between every pair of local sequences. This script times the fusion modules alone, on random inputs:
text keeps ``--text-tokens`` (50) steps, audio and vision get T frames each; each sample is padded to T with a
random valid length in [T/2, T] (key-padding masks, which cost nothing but are passed like in the model).

Fusions, both at width d = 128, 4 heads, ``--depth`` layers, PyTorch's fused scaled-dot-product attention (the
same ``mmsa_emt.nn`` attention / ``FeedForward`` blocks, made fast by ``mmsa_emt.fast``), sinusoidal positions
added to the local sequences:

* ``emt``: ``mmsa_emt.nn.emt.EMT`` with its defaults (all three parameter-sharing levels on, as in the paper);
  input the global context (b, 3, d) and the three local sequences; output the context and the promoted locals.
* ``mult``: :class:`MulTFusion`, written here (see its docstring): 6 crossmodal stacks (target <- source) and a
  width-2d self-attention layer per target.

For every (fusion, T) a fresh subprocess on the CPU (its peak RSS is its own), one subprocess for all of them on
CUDA (the peak is reset before each; it saves a CUDA start per measurement), builds the module and the inputs, then
measures

* time of one forward+backward (parameter gradients and input gradients, loss = sum of the output means):
  median over ``--repeats`` after ``--warmup`` steps (at least one), ``torch.cuda.synchronize`` around each on CUDA;
* peak memory of one forward+backward after the warm-up, above the parameters and inputs with every gradient freed
  (so gradients and activations count; CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``; CPU: the
  process's peak RSS, reset through ``/proc/self/clear_refs`` after ``gc`` and ``malloc_trim``, above its RSS then;
  where that reset is impossible, ``ru_maxrss`` minus the RSS then, which may miss an earlier higher peak and says
  so in the CSV's ``mem_method``);
* FLOPs per sample with ``torch.utils.flop_counter.FlopCounterMode`` on one forward+backward of the same batch,
  counted under the math attention backend (the CPU's fused attention kernel is invisible to the counter; the
  math backend decomposes attention into counted matmuls, so both devices report the same analytic count);
* parameters (shared modules counted once).

Printed: one table, the MulT/EMT ratios per T, and the log-log exponent of time and FLOPs in T (between the smallest
and the largest T, and over the last segment, which is closest to the asymptote). Saved: ``results.csv`` and
``scaling.png`` (time, memory, FLOPs vs T on log-log axes) under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from workspace import resolve_device

from mmsa_emt.fast import apply, speed_config
from mmsa_emt.fast.fusion import FastAttention
from mmsa_emt.nn.emt import EMT, FeedForward, PositionalEmbedding

FUSIONS = ("emt", "mult")
DEFAULT_FRAMES = (50, 100, 200, 500, 1000, 2000)
QUICK_FRAMES = (50, 200, 1000)
MODALITIES = ("text", "audio", "vision")


def attention(dim: int, heads: int, fused: bool) -> FastAttention:
    """The EMT's attention block, with PyTorch's fused kernels (``fused``) or explicit score matrices."""
    block = FastAttention(dim, heads=heads)
    block.fused = fused
    return block


class CrossmodalBlock(nn.Module):
    """One MulT-style crossmodal layer (pre-LN): x <- x + CrossAttn(LN(x), LN_s(source)); x <- x + FFN(LN(x))."""

    def __init__(self, dim: int, *, heads: int, ff_expansion: int = 4, fused: bool = True) -> None:
        super().__init__()
        self.norm_target, self.norm_source = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = attention(dim, heads, fused)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_expansion)

    def forward(self, x: Tensor, source: Tensor, source_mask: Tensor) -> Tensor:
        x = x + self.cross_attn(self.norm_target(x), self.norm_source(source), key_mask=source_mask)
        return x + self.ff(self.norm_ff(x))


class SelfAttentionBlock(nn.Module):
    """One pre-LN transformer layer: x <- x + SelfAttn(LN(x)) (key-padding mask); x <- x + FFN(LN(x))."""

    def __init__(self, dim: int, *, heads: int, ff_expansion: int = 4, fused: bool = True) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = attention(dim, heads, fused)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_expansion)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x), key_mask=mask)
        return x + self.ff(self.norm_ff(x))


class MulTFusion(nn.Module):
    """MulT-style pairwise local-local fusion (written for this benchmark, after the structure of Tsai et al. 2019).

    For each target modality m and each other source modality n (6 ordered pairs), a stack of ``depth``
    :class:`CrossmodalBlock` layers (own parameters per pair and layer): the target sequence H_m (b, t_m, d)
    repeatedly attends to the source H_n (b, t_n, d), with the source's key-padding mask. Per target, its two
    crossmodal outputs are concatenated along the feature axis, (b, t_m, 2d), and pass one
    :class:`SelfAttentionBlock` of width 2d (self-attention with the target's mask + feed-forward), as MulT's
    per-target self-attention transformers do. Sinusoidal positions are added to the inputs first, as in EMT.
    Attention and feed-forward are ``mmsa_emt.nn.emt``'s ``Attention`` and (GEGLU) ``FeedForward``.

    Cost per layer: cross-attention t_m x t_n for every ordered pair, so audio <-> vision is quadratic in T.
    """

    def __init__(self, dim: int, *, depth: int, heads: int, num_modalities: int = 3, ff_expansion: int = 4,
                 fused: bool = True) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.pos_emb = PositionalEmbedding(dim)
        self.pairs = nn.ModuleDict({
            f"{m}<-{n}": nn.ModuleList([CrossmodalBlock(dim, heads=heads, ff_expansion=ff_expansion, fused=fused)
                                       for _ in range(depth)])
            for m in range(num_modalities) for n in range(num_modalities) if n != m})
        self.self_attn = nn.ModuleList([
            SelfAttentionBlock((num_modalities - 1) * dim, heads=heads, ff_expansion=ff_expansion, fused=fused)
            for _ in range(num_modalities)])

    def forward(self, local: Sequence[Tensor], masks: Sequence[Tensor]) -> list[Tensor]:
        """local[k] (b, t_k, d) with masks[k] (b, t_k) True at valid steps; returns per target (b, t_k, 2d)."""
        if not (len(local) == len(masks) == self.num_modalities):
            raise ValueError(f"MulTFusion built for {self.num_modalities} modalities got {len(local)} sequences")
        local = [self.pos_emb(x) for x in local]
        fused = []
        for m in range(self.num_modalities):
            crossed = []
            for n in range(self.num_modalities):
                if n == m:
                    continue
                x = local[m]
                for block in self.pairs[f"{m}<-{n}"]:
                    x = block(x, local[n], masks[n])
                crossed.append(x)
            fused.append(self.self_attn[m](torch.cat(crossed, dim=-1), masks[m]))
        return fused


def build(fusion: str, dim: int, depth: int, heads: int) -> nn.Module:
    if fusion == "emt":
        emt = EMT(dim, depth=depth, heads=heads, num_modalities=3)  # defaults: sinusoidal positions, full sharing
        return apply(emt, speed_config("fast", stack_modalities=None))  # fused attention, as the MulT blocks
    if fusion == "mult":
        return MulTFusion(dim, depth=depth, heads=heads, num_modalities=3)
    raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")


def make_inputs(batch: int, lengths: Sequence[int], dim: int, device: str,
                seed: int = 0) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Global context (b, 3, d), local sequences (b, t_k, d) needing grad, masks with valid lengths in [t/2, t]."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, len(lengths), dim, generator=generator)
    local, masks = [], []
    for t in lengths:
        local.append(torch.randn(batch, t, dim, generator=generator).to(device).requires_grad_())
        valid = torch.randint((t + 1) // 2, t + 1, (batch,), generator=generator)
        masks.append((torch.arange(t)[None] < valid[:, None]).to(device))
    return context.to(device).requires_grad_(), local, masks


def step_fn(fusion: str, model: nn.Module, context: Tensor, local: list[Tensor],
            masks: list[Tensor]) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, clear): one forward+backward of the fusion (loss: sum of the means of all its outputs), which first
    frees the gradients of the parameters and inputs, as ``clear`` alone does."""
    inputs = [context, *local]

    def clear() -> None:
        model.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None

    def step() -> None:
        clear()
        if fusion == "emt":
            out_context, out_local = model(context, local, masks)
            outputs = [out_context, *out_local]
        else:
            outputs = model(local, masks)
        sum(o.mean() for o in outputs).backward()

    return step, clear


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> tuple[int, str]:
    """Release freed heap, reset the peak-RSS mark if the kernel allows; returns (RSS now in KiB, method)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: nothing to trim
    rss = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM and ru_maxrss to the current RSS
        method = "rss_peak_reset"
    except OSError:
        method = "ru_maxrss_lifetime"
    if rss is None:  # no /proc (macOS): ru_maxrss in bytes, lifetime peak
        rss, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "ru_maxrss_lifetime"
    return rss, method


def _peak_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def worker(spec: dict) -> dict:
    """One (fusion, T) measurement; runs in its own process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device, fusion, frames, batch = spec["device"], spec["fusion"], spec["frames"], spec["batch"]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = build(fusion, spec["dim"], spec["depth"], spec["heads"]).to(device).train()
    params = sum(p.numel() for p in model.parameters())  # parameters() yields each shared tensor once
    context, local, masks = make_inputs(batch, (spec["text_tokens"], frames, frames), spec["dim"], device)
    step, clear = step_fn(fusion, model, context, local, masks)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(max(spec["warmup"], 1)):  # first touches of code pages and thread pools are not the module's
        step()
    # peak memory of one forward+backward above parameters and inputs (its gradients included)
    clear()
    if device == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak_mb, mem_method = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda_max_allocated"
    else:
        base_kib, mem_method = _reset_rss_peak()
        step()
        peak_mb = (_peak_rss_kib() - base_kib) / 1024
    times = []
    for _ in range(spec["repeats"]):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return {"frames": frames, "text_tokens": spec["text_tokens"], "fusion": fusion, "device": device,
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": torch.get_num_threads(),
            "batch": batch, "depth": spec["depth"], "dim": spec["dim"], "heads": spec["heads"],
            "repeats": spec["repeats"], "ms": statistics.median(times) * 1e3,
            "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3, "peak_mb": peak_mb, "mem_method": mem_method,
            "gflop_per_sample": counter.get_total_flops() / batch / 1e9, "params": params}


def exponent(rows: list[dict], key: str, lo: int, hi: int) -> float:
    """Slope of log(key) against log(T) between frame counts lo and hi."""
    y = {r["frames"]: r[key] for r in rows}
    return math.log(y[hi] / y[lo]) / math.log(hi / lo)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("ms", "forward+backward time [ms]"), ("peak_mb", "peak memory above build [MB]"),
              ("gflop_per_sample", "GFLOP per sample (fwd+bwd)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label) in zip(axes, panels):
        for fusion, style in zip(FUSIONS, ("o-", "s--")):
            mine = sorted((r for r in rows if r["fusion"] == fusion), key=lambda r: r["frames"])
            ax.plot([r["frames"] for r in mine], [max(r[key], 1e-3) for r in mine], style,
                    label={"emt": "EMT (global-local)", "mult": "MulT-style (pairwise)"}[fusion])
        frames = sorted({r["frames"] for r in rows})
        ref = min(r[key] for r in rows if r["frames"] == frames[-1])
        for power, dash in ((1, ":"), (2, "-.")):  # reference slopes through the lower last point
            ax.plot(frames, [max(ref * (t / frames[-1]) ** power, 1e-3) for t in frames], dash, color="grey",
                    linewidth=0.8, label=rf"$\propto T^{power}$")
        ax.set(xscale="log", yscale="log", xlabel="audio/vision frames T (text: 50 tokens)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help=f"audio/vision frame counts (default {' '.join(map(str, DEFAULT_FRAMES))})")
    parser.add_argument("--text-tokens", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps before the memory step "
                                                                 "(default 2, 1 with --quick; at least 1 is run)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU intra-op threads per measurement (default: PyTorch's choice); 1 avoids the "
                             "spin-wait slow-downs of oversubscribed cores when other processes compete")
    parser.add_argument("--quick", action="store_true",
                        help=f"frames {' '.join(map(str, QUICK_FRAMES))}, 3 repeats, 1 warm-up "
                             "(about 2 minutes on 2 CPU cores)")
    parser.add_argument("--out", default="saved_results/bench_fusion")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        results = []
        for spec in json.loads(args.worker):
            results.append(worker(spec))
            gc.collect()
            if spec["device"] == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(results))
        return

    device = resolve_device(args.device)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    frames = sorted(set(args.frames or (QUICK_FRAMES if args.quick else DEFAULT_FRAMES)))
    repeats = args.repeats or (3 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.quick:
        print(f"--quick: frames {frames}, {repeats} repeats after {warmup} warm-up step(s); "
              f"the full run uses frames {list(DEFAULT_FRAMES)} and 5 repeats")
    threads = args.threads or torch.get_num_threads()
    where = f"cpu, {threads} thread(s)" if device == "cpu" else device
    print(f"device {where}, batch {args.batch}, d={args.dim}, heads={args.heads}, depth={args.depth}, "
          f"text {args.text_tokens} tokens, audio/vision T frames; fused SDPA; "
          + ("one subprocess per (fusion, T)" if device == "cpu" else "one subprocess for all"), flush=True)

    specs = [{"fusion": fusion, "frames": t, "device": device, "batch": args.batch, "dim": args.dim,
              "heads": args.heads, "depth": args.depth, "text_tokens": args.text_tokens, "repeats": repeats,
              "warmup": warmup, "threads": args.threads} for t in frames for fusion in FUSIONS]
    rows = []
    for group in ([s] for s in specs) if device == "cpu" else [specs]:
        result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(group)],
                                capture_output=True, text=True, check=False)
        if result.returncode:
            failed = ", ".join(f"{s['fusion']} T={s['frames']}" for s in group)
            sys.exit(f"{failed} failed:\n{result.stderr[-3000:]}")
        rows += json.loads(result.stdout.strip().splitlines()[-1])

    print(f"\n{'T':>6} {'fusion':<6} {'ms':>10} {'peak MB':>10} {'GFLOP/sample':>13} {'params':>10}")
    for r in rows:
        print(f"{r['frames']:>6} {r['fusion']:<6} {r['ms']:>10.1f} {r['peak_mb']:>10.1f} "
              f"{r['gflop_per_sample']:>13.3f} {r['params']:>10,}")
    if any(r["mem_method"] == "ru_maxrss_lifetime" for r in rows):
        print("note: the peak-RSS mark could not be reset here; CPU memory is the lifetime peak minus the RSS "
              "after building, so small values can be under-reported")

    print("\nMulT/EMT ratios")
    print(f"{'T':>6} {'time':>7} {'memory':>7} {'FLOPs':>7}")
    by = {(r["fusion"], r["frames"]): r for r in rows}
    for t in frames:
        emt, mult = by["emt", t], by["mult", t]
        mem = mult["peak_mb"] / emt["peak_mb"] if emt["peak_mb"] > 0 else float("nan")
        print(f"{t:>6} {mult['ms'] / emt['ms']:>7.2f} {mem:>7.2f} "
              f"{mult['gflop_per_sample'] / emt['gflop_per_sample']:>7.2f}")

    if len(frames) >= 2:
        lo, hi, prev = frames[0], frames[-1], frames[-2]
        print(f"\nscaling exponents p in cost ~ T^p (log-log slope, T {lo}->{hi}; last segment {prev}->{hi} in "
              "brackets)")
        for fusion in FUSIONS:
            mine = [r for r in rows if r["fusion"] == fusion]
            print(f"  {fusion:<5} time T^{exponent(mine, 'ms', lo, hi):.2f} [{exponent(mine, 'ms', prev, hi):.2f}]"
                  f"   FLOPs T^{exponent(mine, 'gflop_per_sample', lo, hi):.2f} "
                  f"[{exponent(mine, 'gflop_per_sample', prev, hi):.2f}]")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    card = rows[0]["card"] + (f", {rows[0]['threads']} thread(s)" if device == "cpu" else "")
    plot(rows, out / "scaling.png",
         f"Fusion modules, fwd+bwd, batch {args.batch}, d={args.dim}, depth {args.depth}, {card}"
         + (" (--quick)" if args.quick else ""))
    print(f"\nsaved {out / 'results.csv'} and {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
