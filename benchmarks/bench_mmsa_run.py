"""One end-to-end ``MMSA_run`` epoch of EMT-DLFR on synthetic mosi-shaped data: baseline mode against fast mode.

    python benchmarks/bench_mmsa_run.py [--quick] [--device auto|cpu|cuda] [--scale 0.1]
                                        [--out saved_results/bench_mmsa_run]

What a user runs: ``MMSA_run('EMT-DLFR', 'mosi', config_file=..., seeds=[1])`` with the repository's mosi config (a
bert-base-sized encoder with random weights, built locally), one epoch (``max_epochs: 1``): data loading, model
building, the training epoch, validation, reloading the best weights and the test. Baseline mode switches the config
to the authors' way of computing (``speed: faithful``); fast mode is the shipped config (``speed: fast``, with
``precision: auto``: bf16 where the device multiplies it natively). The data have MOSI's sequence lengths
(``--quick``: a quarter of them, and fewer samples) and ``--scale`` of its split sizes. Each mode runs once in its
own process after an untimed run of the same mode (caches, CUDA start); printed: wall seconds per run, the training
samples per second this implies, and the ratio, then where the time went in each mode (timers around the package's
functions, CUDA synchronised where they end):

* ``data``: reading and checking the feature file, MMSA's datasets and loaders;
* ``model``: building the network (BERT loaded from disk);
* ``train epoch``: ``train_one_epoch``, the part the speed levers act on (and what a real run repeats per epoch);
* ``valid`` / ``test``: the evaluation passes;
* ``checkpoint``: writing the best weights and reading them back (``trainer.BestCheckpoint``: on CUDA a thread
  writes them while training goes on, and only the time the training thread spends on them or waits for the writer
  counts here; ``torch.load``: MMSA's ``_run`` reloads them);
* ``MMSA's pause``: ``time.sleep(1)`` at the end of MMSA's ``_run``, per seed;
* ``other``: the rest (seeding, logging, results CSV, freeing memory).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from workspace import bert_base, resolve_device, write_workspace

MODES = {  # config overrides: the presets of mmsa_emt.fast
    "baseline": {"speed": "faithful"},
    "fast": {"speed": "fast"},
}


PHASES = ("data", "model", "train epoch", "valid", "test", "checkpoint", "MMSA's pause", "other")


@contextlib.contextmanager
def phase_timers(device: str) -> Iterator[collections.Counter]:
    """Within the block, seconds spent in each of ``PHASES`` but 'other' accumulate in the counter yielded
    (timers wrapped around the functions ``MMSA_run`` calls; nested timed calls count once, in the outer phase)."""
    import MMSA.run as mmsa_run
    import torch

    import mmsa_emt.mmsa.trainer as adapter
    import mmsa_emt.trainer as trainer

    spent: collections.Counter = collections.Counter()
    active: list[str] = []
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def timed(phase: Callable[..., str] | str, function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if active:  # inside another timed call: charged to it
                return function(*args, **kwargs)
            name = phase(*args, **kwargs) if callable(phase) else phase
            active.append(name)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - start
                active.pop()
        return wrapper

    def evaluation(*_args, desc: str = "", **_kwargs) -> str:
        return "test" if desc == "test" else "valid"

    targets = [(mmsa_run, "MMDataLoader", "data"), (mmsa_run, "AMIO", "model"),
               (trainer, "train_one_epoch", "train epoch"), (trainer, "evaluate", evaluation),
               (adapter, "evaluate", evaluation), (trainer.BestCheckpoint, "save", "checkpoint"),
               (trainer.BestCheckpoint, "wait", "checkpoint"), (trainer.BestCheckpoint, "load_into", "checkpoint"),
               (torch, "load", "checkpoint"), (mmsa_run.time, "sleep", "MMSA's pause")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for owner, name, phase in targets:
        setattr(owner, name, timed(phase, getattr(owner, name)))
    try:
        yield spent
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def worker(config: str, device: str, out: Path, mode: str) -> dict[str, float]:
    """Seconds of one MMSA_run (after an untimed one), in all and per phase; runs in its own process."""
    from MMSA import MMSA_run

    import mmsa_emt  # noqa: F401  (registers EMT-DLFR)

    gpu_ids = [0] if device == "cuda" else []
    for attempt in ("warm-up", "timed"):
        with phase_timers(device) as spent:
            start = time.perf_counter()
            MMSA_run("EMT-DLFR", "mosi", config_file=config, seeds=[1], gpu_ids=gpu_ids, num_workers=0,
                     verbose_level=0, model_save_dir=out / mode / attempt / "models",
                     res_save_dir=out / mode / attempt / "results", log_dir=out / mode / attempt / "logs")
            total = time.perf_counter() - start
    return {"total": total, **{p: spent[p] for p in PHASES[:-1]}, "other": total - sum(spent.values())}


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
        print(json.dumps(worker(args.worker[0], device, out, args.worker[1])))
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
        seconds[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        total = seconds[mode]["total"]
        print(f"{mode:8s}: {total:7.1f} s per MMSA_run ({n_train / total:.2f} training samples/s counting "
              "everything)", flush=True)
    base, fast = seconds["baseline"], seconds["fast"]
    print(f"fast/baseline: x{base['total'] / fast['total']:.2f} end to end, "
          f"x{base['train epoch'] / fast['train epoch']:.2f} for the training epoch inside it")
    print(f"\n{'phase':14s} {'baseline s':>10s} {'fast s':>8s} {'ratio':>6s}")
    for phase in ("total", *PHASES):
        ratio = f"x{base[phase] / fast[phase]:.2f}" if fast[phase] > 0.05 else ""
        print(f"{phase:14s} {base[phase]:10.2f} {fast[phase]:8.2f} {ratio:>6s}")
    path = out / "phases.json"
    path.write_text(json.dumps({"device": device, "training_samples": n_train, "scale": scale,
                                "audio_vision_frames": [375 // cut, 500 // cut], "seconds": seconds}, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
