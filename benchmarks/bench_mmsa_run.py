"""One end-to-end ``MMSA_run`` epoch of EMT-DLFR on synthetic mosi-shaped data: baseline mode against fast mode.

    python benchmarks/bench_mmsa_run.py [--quick] [--device auto|cpu|cuda] [--scale 0.1]
                                        [--out saved_results/bench_mmsa_run]

What a user runs: ``MMSA_run('EMT-DLFR', 'mosi', config_file=..., seeds=[1])`` with the repository's mosi config
(a bert-base-sized encoder with random weights, built locally), one epoch (``max_epochs: 1``): data loading, model
building, the training epoch, validation, reloading the best weights and the test. Baseline mode switches the
config to the authors' way of computing (``fused_attention``, ``fused_views``, ``trim_padding`` off, ``precision:
fp32``, ``stack_modalities`` and ``numpy_dropout`` off); fast mode is the shipped config (``precision: auto``:
bf16 on CUDA). The data have MOSI's sequence lengths (``--quick``: a quarter of them, and fewer samples) and
``--scale`` of its split sizes. Each mode runs once in its own process after an untimed run of the same mode
(caches, CUDA start); printed: wall seconds per run, the training samples per second this implies, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from workspace import bert_base, resolve_device, write_workspace

MODES = {
    "baseline": {"fused_attention": False, "fused_views": False, "trim_padding": False, "precision": "fp32",
                 "stack_modalities": False, "numpy_dropout": False},
    "fast": {"precision": "auto"},
}


def worker(config: str, device: str, out: Path, mode: str) -> float:
    """Seconds of one MMSA_run (after an untimed one); runs in its own process."""
    from MMSA import MMSA_run

    import mmsa_emt  # noqa: F401  (registers EMT-DLFR)

    gpu_ids = [0] if device == "cuda" else []
    seconds = []
    for attempt in ("warm-up", "timed"):
        start = time.perf_counter()
        MMSA_run("EMT-DLFR", "mosi", config_file=config, seeds=[1], gpu_ids=gpu_ids, num_workers=0,
                 verbose_level=0, model_save_dir=out / mode / attempt / "models",
                 res_save_dir=out / mode / attempt / "results", log_dir=out / mode / attempt / "logs")
        seconds.append(time.perf_counter() - start)
    return seconds[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a quarter of MOSI's sequence lengths, scale 0.03")
    parser.add_argument("--scale", type=float, default=None, help="of MOSI's split sizes (default 0.1; quick 0.03)")
    parser.add_argument("--out", default="saved_results/bench_mmsa_run")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    out = Path(args.out) / device
    if args.worker:
        print(json.dumps({"seconds": worker(args.worker[0], device, out, args.worker[1])}))
        return

    scale = args.scale or (0.03 if args.quick else 0.1)
    cut = 4 if args.quick else 1
    encoder = bert_base(out / "bert-base")
    data = {"scale": scale, "seed": 0, "audio_len": 375 // cut, "vision_len": 500 // cut}
    common = {"max_epochs": 1, "early_stop": 1}
    n_train = max(8, round(1284 * scale))
    print(f"MMSA_run('EMT-DLFR', 'mosi') on {device}, one epoch of {n_train} training samples, audio/vision "
          f"{375 // cut}/{500 // cut} frames, bert-base-sized encoder", flush=True)
    seconds = {}
    for mode, switches in MODES.items():
        config = write_workspace(out / mode, encoder=encoder, data=data, common={**common, **switches})
        command = [sys.executable, __file__, "--worker", str(config), mode, "--device", device, "--out", args.out]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode:
            sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
        seconds[mode] = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
        print(f"{mode:8s}: {seconds[mode]:7.1f} s per MMSA_run ({n_train / seconds[mode]:.2f} training samples/s "
              "counting everything)", flush=True)
    print(f"fast/baseline: x{seconds['baseline'] / seconds['fast']:.2f} end to end")


if __name__ == "__main__":
    main()
