"""One lever on against off, interleaved in one process: the paired comparison a busy or drifting host allows.

    python benchmarks/bench_levers.py [--levers encoder_fused_qkv fused_views ...] [--size tiny|base]
                                      [--precision bf16|fp32] [--batch 32] [--rounds 9]
                                      [--out saved_results/levers.json]

Separate processes (``bench_train.py``) on a shared host differ by more than most single levers gain: the same
config ran at speeds up to 1.4x apart on one H200 host, and by up to 30 % within an hour on a 2-core CPU. Here one
model (mosi's hyper-parameters, both views, every loss, Adam with accumulation 4) is built once and, for each
lever, made to compute with the lever on and with it off (``mmsa_emt.fast.apply`` swaps module classes in place;
the trainer's levers are read from the ``SpeedConfig`` each pass) in alternating order, on, off, off, on, ...: one
accumulation group of 4 training mini-batches per measurement. Printed per lever: the medians of the two, the
median of the per-round ratios off/on and their range (a ratio above 1: the lever saves time).

``--size base``: a bert-base-sized encoder with random weights and the MOSI shape with audio/vision cut to a quarter
(``bench_train.py --quick``): the step's arithmetic. ``--size tiny``: BERT's 12 layers at width 24 and every
sequence 8 steps long, so that the arithmetic all but vanishes and the step's time is the host's work of
dispatching its operations: what bounds a GPU step of this model (``bench_train.py --profile``: the H200 was busy
15 % of a fast step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train import SHAPES, make_batches
from workspace import bert_base

LEVERS = ("encoder_fused_qkv", "fused_views")


def tiny_bert(folder: Path) -> str:
    """BERT's 12 layers at width 24 (12 heads of 2) with random weights: bert-base's operations, little arithmetic."""
    from transformers import BertConfig, BertModel

    base = bert_base(folder / "vocab-source")  # for its small vocabulary and tokenizer files
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        vocab = len((Path(base) / "vocab.txt").read_text().splitlines())
        BertModel(BertConfig(hidden_size=24, num_attention_heads=12, intermediate_size=48,
                             vocab_size=vocab)).save_pretrained(folder)
        for name in ("vocab.txt", "tokenizer_config.json"):
            (folder / name).write_bytes((Path(base) / name).read_bytes())
    return str(folder)


def build(size: str, encoder: str, precision: str, batch: int | None = None):
    """The model (speed ``fast`` with ``precision``), its optimizer and 4 batches of the shape for ``size``
    (``batch`` samples each; default the shape's)."""
    from mmsa_emt import EMTDLFRConfig
    from mmsa_emt.dlfr import emt_dlfr
    from mmsa_emt.fast import apply, speed_config
    from mmsa_emt.trainer import OptimConfig, build_optimizer

    shape = dict(SHAPES["mosi"])
    if size == "tiny":
        shape.update(text=8, audio=(32, 5), vision=(32, 20))  # cut to a quarter by make_batches: 8 frames
    shape["batch"] = batch or shape["batch"]
    # tiny: the modalities joined along time, as the shipped config runs on CUDA; base: as on a CPU
    speed = speed_config("fast", precision=precision, stack_modalities="time" if size == "tiny" else None)
    speed = speed.resolved("cpu")
    config = EMTDLFRConfig(pretrained=encoder, audio_dim=shape["audio"][1], vision_dim=shape["vision"][1],
                           attn_dropout=0.3, ff_dropout=0.1, post_fusion_dropout=0.3)
    torch.manual_seed(0)
    model = apply(emt_dlfr(config), speed, "cpu")
    return model, build_optimizer(model, OptimConfig()), speed, make_batches(shape, 4, True, encoder)


def compare(model, optimizer, speed, batches, lever: str, rounds: int) -> dict:
    """Training groups with ``lever`` on and off, alternated; seconds per mini-batch of each and their ratios."""
    from mmsa_emt import LossWeights
    from mmsa_emt.fast import apply
    from mmsa_emt.trainer import train_one_epoch

    configs = {"on": dataclasses.replace(speed, **{lever: True}), "off": dataclasses.replace(speed, **{lever: False})}

    def group(which: str) -> float:
        s = configs[which]
        apply(model, s, "cpu")
        start = time.perf_counter()
        train_one_epoch(model, batches, optimizer, LossWeights(), update_every=4, progress=False, speed=s)
        return (time.perf_counter() - start) / len(batches)

    group("on"), group("off")  # warm-up of both paths
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(rounds):
        for which in ("on", "off") if i % 2 == 0 else ("off", "on"):
            times[which].append(group(which))
    apply(model, speed, "cpu")
    ratios = [off / on for on, off in zip(times["on"], times["off"])]
    return {"lever": lever, "on_s": statistics.median(times["on"]), "off_s": statistics.median(times["off"]),
            "ratio_off_on": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS))
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=None, help="samples per mini-batch (default: MOSI's 32)")
    parser.add_argument("--rounds", type=int, default=9, help="measurements of each side per lever")
    parser.add_argument("--out", default="saved_results/levers.json")
    args = parser.parse_args()
    from mmsa_emt.fast import FAST
    from mmsa_emt.fast import LEVERS as KNOWN

    unknown = [lever for lever in args.levers if lever not in KNOWN or not isinstance(getattr(FAST, lever), bool)]
    if unknown:
        parser.error(f"not an on/off lever of this version: {', '.join(unknown)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        encoder = (tiny_bert if args.size == "tiny" else bert_base)(Path(folder) / "bert")
        model, optimizer, speed, batches = build(args.size, encoder, args.precision, args.batch)
        print(f"size {args.size}, batch {len(batches[0].labels)}, {speed.precision}, {torch.get_num_threads()} "
              "threads; seconds per mini-batch")
        for lever in args.levers:
            r = compare(model, optimizer, speed, batches, lever, args.rounds)
            rows.append({"size": args.size, "precision": speed.precision, **r})
            print(f"{lever:20s} on {r['on_s']:.4f}  off {r['off_s']:.4f}  off/on x{r['ratio_off_on']:.3f} "
                  f"(rounds {r['ratio_min']:.3f}-{r['ratio_max']:.3f})", flush=True)
            out.write_text(json.dumps(rows, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
