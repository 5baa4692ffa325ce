"""Training and evaluation speed and memory of EMT-DLFR: faithful baseline mode against fast modes, in one run.

    python benchmarks/bench_train.py [--quick] [--shapes mosi mosei] [--device auto|cpu|cuda]
                                     [--modes baseline fast ...] [--profile] [--out saved_results/bench_train.json]

Modes (``MODES``; each is a preset of ``mmsa_emt.fast`` with overrides, see docs/speed.md):

* ``baseline`` (preset ``faithful``) computes the way the authors' code does: fp32, explicit attention score
  matrices, the complete and incomplete views in two encoder passes, LSTMs over packed sequences, full padding,
  per-tensor Adam, torch's dropout masks, BERT through transformers' forward, the loss read back to the host every
  step;
* ``fast`` (preset ``fast``), what the shipped config does: fused scaled-dot-product attention, both views in one
  pass, LSTMs over the padded batch (``packed_lstm: false``), BERT's layers with one query/key/value matmul
  (``fast.fused_bert``), each batch cut to its longest sequences, no per-step host
  sync, fused Adam, the activations of the fusion's feed-forward blocks recomputed in the backward pass instead of
  kept (``checkpoint_fusion: true``); bf16 autocast where the device multiplies bf16 natively (``precision: auto``:
  CUDA from Ampere on, x86 CPUs with AMX-BF16); on CUDA also the three modalities joined along time into one fusion
  call (``stack_modalities: auto``);
* variants of ``fast`` that change one lever: ``fast-fp32`` (no autocast), ``fast-stack`` / ``fast-nostack`` (the
  modalities joined along time / one fusion call each, whatever the device), ``fast-checkpoint`` /
  ``fast-nocheckpoint`` (recomputing BERT too / nothing), ``fast-bf16`` (bf16 autocast whatever the device),
  ``fast-packed`` (packed LSTMs), ``fast-compile`` (``torch.compile`` of the text encoder and the fusion),
  ``fast-unfusedqkv`` (BERT's layers through transformers' forward, three query/key/value matmuls;
  ``encoder_fused_qkv: false``), ``fast-twopass`` (the complete and the incomplete view in two passes;
  ``fused_views: false``),
  ``fast-noaddmmlt`` (the shipped config with ``DISABLE_ADDMM_CUDA_LT=1`` in the worker's environment: Linear layers
  with a bias through cuBLAS instead of cuBLASLt; on the H200 an ``addmm`` took 146 us of host time against 64 us
  for an ``mm``), ``fast-tcmalloc`` (the shipped config with gperftools' tcmalloc preloaded, Linux only: Debian's
  and Ubuntu's ``libtcmalloc-minimal4``; glibc's malloc returns every large tensor's memory to the system when it is
  freed, so the next one page-faults its memory in again).

Both train the same network (a bert-base-sized encoder with random weights built locally: the same compute as the
real one) on synthetic data of the dataset's shape (``mmsa_emt.synthetic``) with half of every modality missing
(MMSA's draw, ``mmsa_emt.missing``).

Each (shape, mode) runs in a fresh subprocess so that its peak memory is its own: CUDA max allocated, or the
process's peak RSS on the CPU. A training step is forward (both views, every loss), backward and the optimizer step
with the configured gradient accumulation (4, the authors' ``update_epochs``); times are medians over repeats after
a warm-up pass (which also compiles, for ``fast-compile``). FLOPs per sample are counted with
``torch.utils.flop_counter`` on one training step under the math attention backend (it decomposes attention into
counted matmuls; fused kernels are not counted), after the peak memory is read; on CUDA the achieved model FLOP/s is
compared with the card's bf16 peak. ``ops/step`` counts the non-view ATen operations of one training step (forward,
backward, optimizer step; each is at least one kernel launch on a GPU). On CUDA the fast modes also count host
synchronisations in one training step (``torch.cuda.set_sync_debug_mode``), and ``--profile`` writes the top kernels
and the GPU's busy share of a step.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from workspace import bert_base, resolve_device

SHAPES = {  # text tokens, (frames, features) of audio and vision: MMSA's unaligned feature files
    "mosi": {"text": 50, "audio": (375, 5), "vision": (500, 20), "batch": 32},
    "mosei": {"text": 50, "audio": (500, 74), "vision": (500, 35), "batch": 16},
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
MODES = {  # (preset of mmsa_emt.fast, its overrides); "fused_adam" is the optimizer's (build_optimizer)
    "baseline": ("faithful", {"fused_adam": False}),
    "fast": ("fast", {}),
    "fast-fp32": ("fast", {"precision": "fp32"}),
    "fast-stack": ("fast", {"stack_modalities": "time"}),
    "fast-nostack": ("fast", {"stack_modalities": None}),
    "fast-packed": ("fast", {"packed_lstm": True}),
    "fast-compile": ("fast", {"compile": True}),
    "fast-checkpoint": ("fast", {"checkpoint_encoder": True, "checkpoint_fusion": True}),
    "fast-nocheckpoint": ("fast", {"checkpoint_encoder": False, "checkpoint_fusion": False}),
    "fast-bf16": ("fast", {"precision": "bf16"}),
    "fast-unfusedqkv": ("fast", {"encoder_fused_qkv": False}),
    "fast-twopass": ("fast", {"fused_views": False}),
    "fast-noaddmmlt": ("fast", {}),
    "fast-tcmalloc": ("fast", {}),
}
MODE_ENV = {  # environment of a mode's worker process, read by PyTorch at its first use
    "fast-noaddmmlt": {"DISABLE_ADDMM_CUDA_LT": "1"},  # Linear's bias through cuBLAS + a copy, not cuBLASLt
    "fast-tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},  # host memory from tcmalloc, not glibc's malloc
}


def make_batches(shape: dict, n: int, quick: bool, tokenizer: str):
    """n synthetic two-view batches of the dataset's shape (sequences cut to a quarter with --quick)."""
    import numpy as np

    from mmsa_emt.dlfr import TwoViewBatch
    from mmsa_emt.missing import drop_split
    from mmsa_emt.synthetic import make_dataset

    cut = 4 if quick else 1
    b = shape["batch"]
    data = make_dataset("mosi", tokenizer=tokenizer, scale=max(n * b / 1284, 0.01), seed=0,
                        text_len=shape["text"], audio_len=shape["audio"][0] // cut,
                        vision_len=shape["vision"][0] // cut, text_feature_dim=8)["train"]
    rng = np.random.default_rng(0)
    for key, (_, dim) in (("audio", shape["audio"]), ("vision", shape["vision"])):  # the dataset's feature sizes
        steps = data[key].shape[1]
        valid = np.arange(steps)[None] < np.asarray(data[f"{key}_lengths"])[:, None]
        data[key] = rng.standard_normal((len(valid), steps, dim)).astype(np.float32) * valid[..., None]
    incomplete = drop_split(data, (0.5, 0.5, 0.5), (111, 1111, 11111))
    batches = []
    for i in range(n):
        rows = slice(i * b, (i + 1) * b)
        t = lambda x, rows=rows: torch.as_tensor(np.asarray(x)[rows])  # noqa: E731
        text, text_m = t(data["text_bert"]), t(incomplete["text_bert"])
        audio, vision = t(data["audio"]), t(data["vision"])
        audio_len, vision_len = t(data["audio_lengths"]).long(), t(data["vision_lengths"]).long()
        valid = lambda x, n_: (torch.arange(x.shape[1])[None] < n_[:, None]).float()  # noqa: E731
        batches.append(TwoViewBatch(
            text=text, text_m=text_m, audio=audio, audio_m=t(incomplete["audio"]), vision=vision,
            vision_m=t(incomplete["vision"]), audio_lengths=audio_len, vision_lengths=vision_len,
            text_dropped=(text_m[:, 0] == 100).float() * text[:, 1],
            audio_dropped=valid(audio, audio_len) * (t(incomplete["audio"]).abs().sum(-1) == 0).float(),
            vision_dropped=valid(vision, vision_len) * (t(incomplete["vision"]).abs().sum(-1) == 0).float(),
            labels=t(data["regression_labels"]).float()))
    return batches


def count_host_syncs(step) -> tuple[int, str]:
    """Host synchronisations CUDA reports during ``step()``: their count and the first one's message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    return len(syncs), syncs[0][:300] if syncs else ""


class OpCensus(TorchDispatchMode):
    """Counts non-view ATen operations per phase ('forward:<part>', 'backward', 'optimizer')."""

    def __init__(self) -> None:
        super().__init__()
        self.phase, self.counts = "forward", collections.Counter()
        self.parts: list[str] = ["objective"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[f"forward:{self.parts[-1]}" if self.phase == "forward" else self.phase] += 1
        return func(*args, **(kwargs or {}))

    def track_parts(self, model: torch.nn.Module) -> list:
        """Forward operations are charged to the model's top-level part running them (else to the objective);
        returns the hooks' handles."""
        def leave(_module, _args, _output) -> None:  # a forward hook returning a value would replace the output
            self.parts.pop()

        handles = []
        for name, child in model.named_children():
            handles.append(child.register_forward_pre_hook(lambda _m, _a, name=name: self.parts.append(name)))
            handles.append(child.register_forward_hook(leave))
        return handles


def count_ops(step) -> int:
    """Non-view ATen operations dispatched during ``step()``, backward included: each launches at least one
    kernel on a GPU, so this is the device-independent measure of launch overhead."""
    with OpCensus() as counter:
        step()
    return sum(counter.counts.values())


def profile_step(step, path: Path) -> float:
    """Writes the top CUDA kernels of two steps to ``path``; returns the GPU's busy share of the wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        step()
        torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    path.write_text(f"GPU busy {busy_us / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall ({100 * busy_us / wall_us:.0f}%),"
                    f" {len(kernels)} kernels, two training steps\n\n"
                    + prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))
    return busy_us / wall_us


def setup(shape_name: str, mode: str, device: str, encoder: str, *, as_device: str | None = None,
          attn_dropout: float = 0.3):
    """The network (mosi's hyper-parameters), optimizer and ``SpeedConfig`` a mode trains with on ``device``;
    its 'auto' switches resolved as on ``as_device`` (default: ``device``)."""
    import dataclasses

    from mmsa_emt import EMTDLFRConfig
    from mmsa_emt.dlfr import emt_dlfr
    from mmsa_emt.fast import apply, auto_precision, speed_config
    from mmsa_emt.trainer import OptimConfig, build_optimizer

    shape, on_cuda = SHAPES[shape_name], (as_device or device) == "cuda"
    preset, overrides = MODES[mode]
    overrides = dict(overrides)
    fused_adam = overrides.pop("fused_adam", None)
    speed = speed_config(preset, **overrides)
    if speed.precision == "auto":  # counted as CUDA on a CPU: the H200's
        speed = dataclasses.replace(speed, precision="bf16" if on_cuda and device != "cuda" else auto_precision(device))
    speed = speed.resolved(as_device or device)
    config = EMTDLFRConfig(pretrained=encoder, audio_dim=shape["audio"][1], vision_dim=shape["vision"][1],
                           attn_dropout=attn_dropout, ff_dropout=0.1, post_fusion_dropout=0.3)
    torch.manual_seed(0)
    model = apply(emt_dlfr(config), speed, as_device or device).to(device)
    optimizer = build_optimizer(model, OptimConfig(), fused=fused_adam)
    return model, optimizer, speed


def worker(shape_name: str, mode: str, device: str, quick: bool, encoder: str, profile_dir: str,
           steps: int | None = None, repeats: int | None = None) -> dict:
    """One (shape, mode) measurement; runs in its own process."""
    preload = MODE_ENV.get(mode, {}).get("LD_PRELOAD")
    if preload and preload not in Path("/proc/self/maps").read_text():  # the loader only warns when it cannot
        raise SystemExit(f"{mode}: {preload} was not preloaded (Debian/Ubuntu: apt install libtcmalloc-minimal4)")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mmsa_emt import LossWeights, compute_loss
    from mmsa_emt.trainer import evaluate, train_one_epoch

    shape = SHAPES[shape_name]
    steps, repeats = steps or (4 if quick else 8), repeats or (2 if quick else 3)
    batches = make_batches(shape, steps, quick, encoder)
    model, optimizer, speed = setup(shape_name, mode, device, encoder)
    precision = speed.precision
    weights = LossWeights()
    b = shape["batch"]

    speed.prepare_model(model)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def train_pass() -> None:
        train_one_epoch(model, batches, optimizer, weights, update_every=4, device=device, progress=False,
                        speed=speed)

    def eval_pass() -> None:
        evaluate(model, batches, weights, device=device, progress=False, speed=speed)

    def timed(run) -> list[float]:
        run()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append((time.perf_counter() - start) / steps)
        return times

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    train = timed(train_pass)
    evaluation = timed(eval_pass)
    warmup_s = time.perf_counter() - compile_start - (sum(train) + sum(evaluation)) * steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    gflop = math.nan  # the compiled network is fast's: counted there
    if not speed.compile:  # after the peak: the math backend materialises every attention matrix
        model.train()
        with FlopCounterMode(display=False) as counter, speed.autocast(device), sdpa_kernel(SDPBackend.MATH):
            compute_loss(model, speed.prepare(batches[0], device), weights).total.backward()
        optimizer.zero_grad(set_to_none=True)
        gflop = counter.get_total_flops() / b / 1e9
    result = {"shape": shape_name, "mode": mode, "device": device, "precision": precision,
              "train_ms": statistics.median(train) * 1e3, "train_spread_ms": (max(train) - min(train)) * 1e3,
              "eval_ms": statistics.median(evaluation) * 1e3, "train_samples_s": b / statistics.median(train),
              "eval_samples_s": b / statistics.median(evaluation), "peak_gib": peak, "warmup_s": warmup_s,
              "gflop_per_sample": gflop,
              "card": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    def steps_of(n: int):
        return lambda: train_one_epoch(model, batches[:n], optimizer, weights, device=device, progress=False,
                                       speed=speed)

    one_step = steps_of(1)
    if not speed.compile:
        result["ops_per_step"] = count_ops(one_step)
    else:  # what TorchDynamo made of the step: any graph break or recompilation costs launches and warm-up
        from torch._dynamo.utils import counters

        result["graph_breaks"] = sum(counters["graph_break"].values())
        result["graphs"] = counters["stats"]["unique_graphs"]
    if device == "cuda" and not speed.sync_every_step:
        per_epoch, result["first_sync"] = count_host_syncs(one_step)  # the epoch's summary reads back once
        result["host_syncs"] = count_host_syncs(steps_of(2))[0] - per_epoch  # so one more step adds these
        if profile_dir:
            path = Path(profile_dir) / f"profile_{shape_name}_{mode}.txt"
            result["gpu_busy"] = profile_step(one_step, path)
    return result


def print_row(r: dict) -> None:
    print(f"{r['shape']:6s} {r['mode']:12s} {r['device']} {r['precision']}: train {r['train_ms']:8.1f} ms/step "
          f"(spread {r['train_spread_ms']:.1f}) {r['train_samples_s']:7.2f} samples/s | eval "
          f"{r['eval_samples_s']:7.2f} samples/s | peak {r['peak_gib']:.2f} GiB | "
          f"{r['gflop_per_sample']:.1f} GFLOP/sample | {r.get('ops_per_step', 'n/a')} ops/step | "
          f"warm-up {r['warmup_s']:.0f} s", flush=True)
    if "graphs" in r:
        print(f"        compiled: {r['graphs']} graphs, {r['graph_breaks']} graph breaks", flush=True)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in r["card"]), None)
    if r["device"] == "cuda":
        extra = f"        {r['card']}; host syncs per step: {r.get('host_syncs', 'n/a')}"
        if "gpu_busy" in r:
            extra += f"; GPU busy {100 * r['gpu_busy']:.0f}% of a step"
        if peak:
            achieved = r["gflop_per_sample"] * r["train_samples_s"] / 1e3
            extra += f"; {achieved:.1f} TFLOP/s = {100 * achieved / peak:.1f}% of bf16 peak ({peak:.0f})"
        print(extra, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mosi", "mosei"], choices=sorted(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["baseline", "fast"], choices=list(MODES),
                        help="ratios are printed against baseline when it is among them")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and audio/vision sequences cut to a quarter (a few minutes on 2 cores)")
    parser.add_argument("--profile", action="store_true", help="CUDA: write each fast mode's top kernels")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per (shape, mode) before giving up")
    parser.add_argument("--out", default="saved_results/bench_train.json")
    parser.add_argument("--steps", type=int, default=None, help="batches per timed pass (default 8; quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes after the warm-up (default 3; "
                        "quick 2)")
    parser.add_argument("--worker", nargs=4, metavar=("SHAPE", "MODE", "DEVICE", "ENCODER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.worker:
        shape, mode, device, encoder = args.worker
        print(json.dumps(worker(shape, mode, device, args.quick, encoder, str(out.parent) if args.profile else "",
                                args.steps, args.repeats)))
        return

    device = resolve_device(args.device)
    if args.quick:
        print("--quick: 4 steps x 2 repeats, audio/vision sequences cut to a quarter of the dataset's length")
    out.parent.mkdir(parents=True, exist_ok=True)
    modes = list(dict.fromkeys(args.modes))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        encoder = bert_base(Path(folder) / "bert-base")
        for shape in args.shapes:
            for mode in modes:
                command = [sys.executable, __file__, "--worker", shape, mode, device, encoder, "--out", str(out)]
                command += ["--quick"] * args.quick + ["--profile"] * args.profile
                command += [f"--{k}={v}" for k, v in (("steps", args.steps), ("repeats", args.repeats)) if v]
                try:
                    result = subprocess.run(command, capture_output=True, text=True, check=False,
                                            timeout=args.timeout, env={**os.environ, **MODE_ENV.get(mode, {})})
                except subprocess.TimeoutExpired:
                    print(f"{shape:6s} {mode:12s} gave up after {args.timeout:.0f} s", flush=True)
                    continue
                if result.returncode:
                    print(f"{shape}/{mode} failed:\n{result.stderr[-3000:]}", flush=True)
                    continue
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print_row(rows[-1])
                out.write_text(json.dumps(rows, indent=2))
    for shape in args.shapes:
        done = {r["mode"]: r for r in rows if r["shape"] == shape}
        if "baseline" not in done:
            continue
        base = done["baseline"]
        for mode, r in done.items():
            if mode != "baseline":
                print(f"{shape}: {mode}/baseline  train x{r['train_samples_s'] / base['train_samples_s']:.2f}  "
                      f"eval x{r['eval_samples_s'] / base['eval_samples_s']:.2f}  "
                      f"peak memory x{r['peak_gib'] / base['peak_gib']:.2f}")
    print(f"saved {out}")
    if len(rows) < len(args.shapes) * len(modes):
        sys.exit("some measurements failed (see above)")


if __name__ == "__main__":
    main()
