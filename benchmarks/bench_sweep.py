"""One small robustness sweep run serially, then on a local Ray with 2 workers: wall time of each and their ratio.

    python benchmarks/bench_sweep.py [--models EMT-DLFR TFN] [--rates 0 0.5 1] [--seeds 1 2] [--epochs 2]
                                     [--scale 0.05] [--workers 2] [--gpus-per-trial 0] [--out saved_results/bench_sweep]

Synthetic MOSI-shaped data (``--scale`` of MOSI's split sizes, short sequences) and a small BERT with random
weights, built locally (nothing downloaded). ``serial`` is the default executor (one trial after another in this
process, torch at its default thread count); ``ray`` starts a local Ray with ``--workers`` CPUs (and the GPUs of
this machine) and runs the same trials ``--workers`` at a time, each with ``--cpus-per-trial`` threads (default 1)
and ``--gpus-per-trial`` of a GPU. Each run writes to its own folder, so both train every trial. Printed: wall
seconds of each, the mean seconds per trial (the results' ``seconds`` column) and the speed-up serial/ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["EMT-DLFR", "TFN"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--out", default="saved_results/bench_sweep")
    args = parser.parse_args()

    import ray

    from mmsa_emt.robustness import read_results, results_path, sweep
    from mmsa_emt.robustness.executors import ExecutorSettings
    from mmsa_emt.synthetic import write_dataset, write_tiny_bert

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    encoder = write_tiny_bert(work / "encoder", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128)
    config = json.loads(Path(__file__).resolve().parents[1].joinpath("config", "config_regression.json").read_text())
    config["datasetCommonParams"]["dataset_root_dir"] = str(work / "dataset")
    feature = work / "dataset" / config["datasetCommonParams"]["mosi"]["unaligned"]["featurePath"]
    write_dataset(feature, "mosi", tokenizer=str(encoder), scale=args.scale, text_len=24, audio_len=40,
                  vision_len=40, text_feature_dim=64)
    config["emt-dlfr"]["datasetParams"]["mosi"].update(pretrained=str(encoder), d_model=32, batch_size=16)
    config_file = work / "config.json"
    config_file.write_text(json.dumps(config))
    settings = {"rates": args.rates, "seeds": args.seeds, "progress": False, "echo": lambda _: None,
                "overrides": {"max_epochs": args.epochs, "early_stop": args.epochs}}
    n = len(args.models) * len(args.rates) * len(args.seeds)
    print(f"{n} trials ({', '.join(args.models)}; rates {args.rates}; seeds {args.seeds}; {args.epochs} epochs; "
          f"{os.cpu_count()} CPUs here)")

    times = {}
    start = time.perf_counter()
    sweep(args.models, "mosi", config_file, out_dir=out / "serial", **settings)
    times["serial"] = time.perf_counter() - start
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        sweep(args.models, "mosi", config_file, out_dir=out / "ray", **settings,
              executor=ExecutorSettings(kind="ray", cpus_per_trial=args.cpus_per_trial,
                                        gpus_per_trial=args.gpus_per_trial))
        times["ray"] = time.perf_counter() - start
    finally:
        ray.shutdown()
    for name, seconds in times.items():
        per_trial = read_results(results_path(out / name, "mosi")).groupby(["model", "rate_t", "seed"]).seconds.first()
        print(f"{name:>6}: {seconds:7.1f} s wall, {per_trial.mean():6.2f} s per trial (mean of {len(per_trial)})")
    print(f"speed-up serial / ray ({args.workers} workers): x{times['serial'] / times['ray']:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
