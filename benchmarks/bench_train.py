"""Training and evaluation speed and memory of EMT-DLFR: faithful baseline mode against fast mode, in one run.

    python benchmarks/bench_train.py [--quick] [--shapes mosi mosei] [--device auto|cpu|cuda]

Baseline mode computes the way the authors' code does: fp32, explicit attention score matrices, the complete and
incomplete views in two encoder passes, full padding, the loss read back to the host every step. Fast mode: fused
scaled-dot-product attention, both views in one pass, each batch cut to its longest sequences, bf16 autocast on
CUDA (fp32 on the CPU), no per-step host sync. Both train the same network (a bert-base-sized encoder with random
weights built locally: the same compute as the real one) on synthetic data of the dataset's shape
(``mmsa_emt.synthetic``) with half of every modality missing (MMSA's draw, ``mmsa_emt.missing``).

Each (shape, mode) runs in a fresh subprocess so that its peak memory is its own: CUDA max allocated, or the
process's peak RSS on the CPU. A training step is forward (both views, every loss), backward and the optimizer
step with the configured gradient accumulation; times are medians over repeats after a warm-up. FLOPs per sample
are counted with ``torch.utils.flop_counter`` on one training step; on CUDA the achieved model FLOP/s is compared
with the card's bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # text tokens, (frames, features) of audio and vision: MMSA's unaligned feature files
    "mosi": {"text": 50, "audio": (375, 5), "vision": (500, 20), "batch": 32},
    "mosei": {"text": 50, "audio": (500, 74), "vision": (500, 35), "batch": 16},
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
MODES = ("baseline", "fast")


def make_batches(shape: dict, n: int, quick: bool):
    """n synthetic two-view batches of the dataset's shape (sequences cut to a quarter with --quick)."""
    import numpy as np

    from mmsa_emt.demo import minilm_path
    from mmsa_emt.missing import drop_split
    from mmsa_emt.objective import TwoViewBatch
    from mmsa_emt.synthetic import make_dataset

    cut = 4 if quick else 1
    b = shape["batch"]
    data = make_dataset("mosi", tokenizer=str(minilm_path()), scale=max(n * b / 1284, 0.01), seed=0,
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


def worker(shape_name: str, mode: str, device: str, quick: bool, encoder: str) -> dict:
    """One (shape, mode) measurement; runs in its own process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mmsa_emt import EMTDLFR, EMTDLFRConfig, LossWeights, compute_loss
    from mmsa_emt.trainer import OptimConfig, SpeedConfig, build_optimizer, evaluate, train_one_epoch

    shape = SHAPES[shape_name]
    fast = mode == "fast"
    steps, repeats = (4, 2) if quick else (8, 3)
    batches = make_batches(shape, steps, quick)
    config = EMTDLFRConfig(pretrained=encoder, audio_dim=shape["audio"][1], vision_dim=shape["vision"][1],
                           attn_dropout=0.3, ff_dropout=0.1, post_fusion_dropout=0.3,
                           fused_attention=fast, fused_views=fast)  # mosi's hyper-parameters
    torch.manual_seed(0)
    model = EMTDLFR(config).to(device)
    optimizer = build_optimizer(model, OptimConfig())
    precision = "bf16" if fast and device == "cuda" else "fp32"
    speed = SpeedConfig(trim_padding=fast, precision=precision, sync_every_step=not fast)
    weights = LossWeights()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

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
    train = timed(lambda: train_one_epoch(model, batches, optimizer, weights, update_every=4, device=device,
                                          progress=False, speed=speed))
    evaluation = timed(lambda: evaluate(model, batches, weights, device=device, progress=False, speed=speed))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    model.train()
    batch = speed.prepare(batches[0], device)
    # the math backend breaks attention into counted matmuls (fused CPU kernels are not counted)
    with FlopCounterMode(display=False) as counter, speed.autocast(device), sdpa_kernel(SDPBackend.MATH):
        compute_loss(model, batch, weights).total.backward()
    b = shape["batch"]
    return {"shape": shape_name, "mode": mode, "device": device, "precision": precision,
            "train_ms": statistics.median(train) * 1e3, "train_spread_ms": (max(train) - min(train)) * 1e3,
            "eval_ms": statistics.median(evaluation) * 1e3, "train_samples_s": b / statistics.median(train),
            "eval_samples_s": b / statistics.median(evaluation), "peak_gib": peak,
            "gflop_per_sample": counter.get_total_flops() / b / 1e9,
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def bert_base(folder: Path) -> str:
    """A bert-base-uncased-sized encoder with random weights (nothing downloaded)."""
    from transformers import BertConfig, BertModel

    if not (folder / "config.json").is_file():
        BertModel(BertConfig()).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mosi", "mosei"], choices=sorted(SHAPES))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and audio/vision sequences cut to a quarter (a few minutes on 2 cores)")
    parser.add_argument("--out", default="saved_results/bench_train.json")
    parser.add_argument("--worker", nargs=4, metavar=("SHAPE", "MODE", "DEVICE", "ENCODER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, mode, device, encoder = args.worker
        print(json.dumps(worker(shape, mode, device, args.quick, encoder)))
        return

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.quick:
        print("--quick: 4 steps x 2 repeats, audio/vision sequences cut to a quarter of the dataset's length")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        encoder = bert_base(Path(folder) / "bert-base")
        for shape in args.shapes:
            for mode in MODES:
                command = [sys.executable, __file__, "--worker", shape, mode, device, encoder]
                command += ["--quick"] if args.quick else []
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode:
                    sys.exit(f"{shape}/{mode} failed:\n{result.stderr[-3000:]}")
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"{shape:6s} {mode:8s} {r['device']} {r['precision']}: train {r['train_ms']:8.1f} ms/step "
                      f"(spread {r['train_spread_ms']:.1f}) {r['train_samples_s']:7.2f} samples/s | eval "
                      f"{r['eval_samples_s']:7.2f} samples/s | peak {r['peak_gib']:.2f} GiB | "
                      f"{r['gflop_per_sample']:.1f} GFLOP/sample", flush=True)
                peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in r["card"]), None)
                if peak and r["device"] == "cuda":
                    achieved = r["gflop_per_sample"] * r["train_samples_s"] / 1e3
                    print(f"        achieved {achieved:.1f} TFLOP/s = {100 * achieved / peak:.1f}% of the card's bf16 "
                          f"peak ({peak:.0f} TFLOP/s)")
    for shape in args.shapes:
        base, fast = (next(r for r in rows if r["shape"] == shape and r["mode"] == m) for m in MODES)
        print(f"{shape}: fast/baseline  train x{fast['train_samples_s'] / base['train_samples_s']:.2f}  "
              f"eval x{fast['eval_samples_s'] / base['eval_samples_s']:.2f}  "
              f"peak memory x{fast['peak_gib'] / base['peak_gib']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
