"""Do two ways of computing EMT-DLFR give the same test metrics, within seed noise? A planted-signal report.

    python benchmarks/metrics_report.py [--device auto|cpu|cuda] [--seeds 1 2 3 4 5]
                                        [--variants fp32 bf16] [--out saved_results/metrics_report]

Variants (``VARIANTS``, config overrides): ``fp32`` and ``bf16`` (precision, the rest shipped), ``baseline`` (the
authors' way: explicit attention, two passes, packed LSTMs, full padding, no stacking or recomputation, fp32,
torch's dropout masks) and ``shipped`` (the config as shipped for the device), ``authors-kernels`` (shipped, but
explicit attention matrices, packed LSTMs, torch's dropout masks and nothing recomputed: on a CPU, the same
dropout as the authors' code instead of the chunked attention and numpy's masks).

A synthetic MOSI-shaped dataset (``mmsa_emt.synthetic``: sentiment-template sentences, audio and vision carrying the
label with strength 3) and a small randomly initialised BERT are written to ``--out``; then, for each variant, the
robustness sweep (``mmsa_emt.robustness.sweep``, protocol train-once at missing rate 0.5 as the mosi config trains)
trains one small EMT-DLFR per seed through MMSA's pipeline and tests it at missing rates 0 and 0.5. Same seeds,
same data order and initial weights: the variants differ only in arithmetic and random streams.

Printed per rate and metric: mean and std over seeds for each variant, the mean of the per-seed differences
(second - first) with its std, and the verdict: *within seed noise* when |difference of means| <= 2 x its
standard error (sqrt(s_a^2/n + s_b^2/n), an unpaired two-sample bound): the two are then indistinguishable on this
set. Saved: ``results.csv`` (every seed) and ``report.md`` under ``--out``; finished trials are reused on a rerun.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
import torch
from workspace import resolve_device, write_workspace

from mmsa_emt.robustness import metrics_for, sweep, to_markdown
from mmsa_emt.synthetic import write_tiny_bert

VARIANTS = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "baseline": {"speed": "faithful"},
    "shipped": {},
    "authors-kernels": {"fused_attention": False, "packed_lstm": True, "checkpoint_fusion": False,
                        "numpy_dropout": False, "encoder_fused_qkv": False},
}
SMALL_MODEL = {"d_model": 32, "a_lstm_hidden_size": 16, "v_lstm_hidden_size": 16, "post_fusion_dim": 32,
               "fusion_layers": 2, "batch_size": 16, "learning_rate_other": 2e-3, "learning_rate_bert": 1e-4}


def compare(results: pd.DataFrame, variants: list[str], dataset: str = "mosi") -> pd.DataFrame:
    """One row per (rate, metric): mean/std per variant, paired difference, and whether it is seed noise."""
    base, other = variants
    rows = []
    for rate, at_rate in results.groupby("rate_t"):
        for key, name, scale in metrics_for(dataset):
            wide = at_rate.pivot_table(index="seed", columns="variant", values=key) * scale
            a, b = wide[base], wide[other]
            n = len(wide)
            diff = b - a
            bound = 2 * math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / n) if n > 1 else math.nan
            rows.append({"missing rate": rate, "metric": name, f"{base} mean": a.mean(), f"{base} std": a.std(ddof=1),
                         f"{other} mean": b.mean(), f"{other} std": b.std(ddof=1),
                         f"{other}-{base} (paired mean)": diff.mean(), "paired std": diff.std(ddof=1),
                         "2 x std error": bound,
                         "within seed noise": bool(abs(b.mean() - a.mean()) <= bound) if n > 1 else None})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--variants", nargs=2, default=["fp32", "bf16"], choices=list(VARIANTS))
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--out", default="saved_results/metrics_report")
    args = parser.parse_args()
    device = resolve_device(args.device)
    out = Path(args.out) / device
    encoder = out / "bert"
    if not (encoder / "config.json").is_file():
        write_tiny_bert(encoder, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    config = write_workspace(out, encoder=str(encoder),
                             data={"scale": 0.2, "seed": 0, "text_len": 24, "audio_len": 40, "vision_len": 40,
                                   "signal_audio": 3.0, "signal_vision": 3.0},
                             common={"max_epochs": args.max_epochs, "early_stop": 4, "update_epochs": 1},
                             model=SMALL_MODEL)
    frames = []
    for variant in args.variants:
        start = time.time()
        result = sweep("EMT-DLFR", "mosi", config, rates=[0.0, 0.5], seeds=args.seeds, protocol="train-once",
                       train_rate=0.5, out_dir=out / variant, gpu_ids=[0] if device == "cuda" else [],
                       overrides=VARIANTS[variant] or None, echo=lambda _: None)
        frames.append(result.results.assign(variant=variant))
        print(f"{variant}: {len(args.seeds)} seeds on {device} in {time.time() - start:.0f} s", flush=True)
    results = pd.concat(frames, ignore_index=True)
    results = results[results.seed.isin(args.seeds)]
    results.to_csv(out / "results.csv", index=False)
    table = compare(results, list(args.variants))
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    text = (f"# {args.variants[1]} vs {args.variants[0]} on a planted-signal MOSI-shaped set ({card}, seeds "
            f"{args.seeds})\n\n{to_markdown(table)}\n")
    (out / "report.md").write_text(text, encoding="utf-8")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"saved {out / 'results.csv'} and {out / 'report.md'}")


if __name__ == "__main__":
    main()
