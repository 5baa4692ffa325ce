"""The subcommands ``train``, ``test`` and ``list`` of ``mmsa-emt``, with MMSA's flag spellings (``python -m MMSA
-m tfn -d mosi -s 1111 -c config.json``). Heavy imports (MMSA, torch) happen when a command runs, not for --help."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .cli import add_set_option, parse_overrides

Handler = Callable[[argparse.Namespace, argparse.ArgumentParser], None]
DEFAULT_TEST_OUT = "saved_results/test/{dataset}.csv"


def add_parsers(commands: Any) -> dict[str, Handler]:
    """Adds train, test and list to the subparsers ``commands``; returns their handlers by name."""
    config_help = "config file (default: the package's, merged into MMSA's)"

    train = commands.add_parser("train", help="train and test with MMSA_run (EMT-DLFR or any MMSA model): results "
                                              "CSV, checkpoints that carry their config, log",
                                description="Trains and tests with MMSA_run, as `python -m MMSA` does; EMT-DLFR "
                                            "and MMSA's own models alike.")
    train.add_argument("-m", "--model", required=True, help="emt-dlfr or an MMSA model name (tfn, self_mm, ...)")
    train.add_argument("-d", "--dataset", required=True, help="mosi, mosei, sims or another dataset of the config")
    train.add_argument("-c", "--config", default="", help=config_help)
    train.add_argument("-s", "--seeds", nargs="+", type=int, action="extend", default=[],
                       help="random seeds, one training each (default: MMSA's 1111 1112 1113 1114 1115)")
    train.add_argument("-g", "--gpu-ids", nargs="*", type=int, action="extend", default=[],
                       help="GPU to use (default: the most free GPU, else the CPU)")
    train.add_argument("-n", "--num-workers", type=int, default=0, help="data loader workers (default: 0)")
    train.add_argument("-v", "--verbose", type=int, default=1, help="0 errors, 1 info, 2 debug (default: 1)")
    train.add_argument("-t", "--tune", action="store_true", help="random search over the config's debugParams "
                                                                 "(use a tune config, e.g. config_tune.json)")
    train.add_argument("-tt", "--tune-times", type=int, default=50, help="trials of --tune (default: 50)")
    train.add_argument("--model-save-dir", default=None, help="checkpoints (default: MMSA's ~/MMSA/saved_models)")
    train.add_argument("--res-save-dir", default=None, help="results CSV: <dir>/normal/<dataset>.csv, one row "
                                                            "added per run (default: MMSA's ~/MMSA/results)")
    train.add_argument("--log-dir", default=None, help="log file <model>-<dataset>.log (default: MMSA's ~/MMSA/logs)")
    add_set_option(train, "override config values, checked before training")

    test = commands.add_parser("test", help="evaluate saved weights on a split of the feature file; print and save "
                                            "MMSA's metrics",
                               description="Evaluates a checkpoint as MMSA_run tests (same loaders, the dataset's "
                                           "metrics from the model's MMSA trainer). A checkpoint written by "
                                           "mmsa-emt carries its model config and run settings; a weight-only "
                                           "file needs -c (and -m if it is not EMT-DLFR).")
    test.add_argument("--checkpoint", required=True, help="weights file (.pth) written by train/MMSA_run")
    test.add_argument("-d", "--dataset", required=True, help="dataset whose feature file is read")
    test.add_argument("-c", "--config", default=None,
                      help="config file: the feature file's location; for a weight-only file also the model "
                           "(required then). Default for a checkpoint that carries its config: the package's, "
                           "merged into MMSA's")
    test.add_argument("-m", "--model", default=None, help="model of a weight-only file (default: emt-dlfr)")
    test.add_argument("--split", choices=["test", "valid", "train"], default="test", help="(default: test)")
    test.add_argument("--missing-rate", type=float, default=None,
                      help="missing rate of every modality (default: the run's own rate, as MMSA_run tested)")
    test.add_argument("-g", "--gpu-ids", nargs="*", type=int, action="extend", default=[],
                      help="GPU to use (default: the most free GPU, else the CPU)")
    test.add_argument("-n", "--num-workers", type=int, default=0, help="data loader workers (default: 0)")
    test.add_argument("--out", default=None,
                      help=f"results CSV; one row is appended per call (the file is created if absent, never "
                           f"overwritten) (default: {DEFAULT_TEST_OUT})")

    listing = commands.add_parser("list", help="models (mmsa-emt's and MMSA's), datasets of a config, and every "
                                               "EMT-DLFR config key with its default")
    listing.add_argument("-c", "--config", default="", help=config_help)
    return {"train": run_train, "test": run_test, "list": run_list}


def _fail(parser: argparse.ArgumentParser, error: Exception) -> None:
    parser.error(str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error))


def check_overrides(model: str, dataset: str, config_file: str | Path, overrides: Mapping[str, Any],
                    gpu_ids: Sequence[int], *, tune: bool = False) -> None:
    """Every setting of the run checked before anything is trained: EMT-DLFR's by the settings table (an unknown
    key names the closest); an MMSA model's ``--set`` keys must be keys of its config entry or ones every model
    reads (``settings.SHARED_KEYS``, normalize_features): MMSA would silently ignore any other."""
    from . import settings
    from .mmsa.config import check_args, load_config, make_args, trial_args
    from .mmsa.config import is_ours as _is_ours

    base = load_config(model, dataset, config_file, tune=tune)
    if not _is_ours(base):
        known = {*base, *settings.SHARED_KEYS, "normalize_features"}
        unknown = [k for k in overrides if k not in known]
        if unknown:
            raise settings.SettingError(
                f"--set {', '.join(repr(k) + settings.suggestion(k, known) for k in unknown)}: not a config key of "
                f"{base['model_name']} in {config_file}; MMSA would ignore it")
    if tune:  # a trial's values are drawn from debugParams; they are checked again before each trial's first batch
        args = make_args({**base, **overrides, "device": settings.checked_assign_gpu(gpu_ids)})
        check_args(args)
    else:
        trial_args(model, dataset, config_file, overrides=overrides, gpu_ids=gpu_ids)


def run_train(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    overrides = parse_overrides(ns.set)
    try:
        check_overrides(ns.model, ns.dataset, ns.config, overrides, ns.gpu_ids, tune=ns.tune)
    except (ValueError, KeyError, FileNotFoundError) as error:
        _fail(parser, error)
    from .mmsa.run import run_mmsa  # MMSA_run, with mmsa-emt's models registered

    run_mmsa(ns.model, ns.dataset, config_file=ns.config, config=overrides or None, seeds=list(ns.seeds),
             is_tune=ns.tune, tune_times=ns.tune_times, gpu_ids=list(ns.gpu_ids), num_workers=ns.num_workers,
             verbose_level=ns.verbose, model_save_dir=ns.model_save_dir, res_save_dir=ns.res_save_dir,
             log_dir=ns.log_dir)


def run_test(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .configs import merged_config_file
    from .mmsa.config import feature_file
    from .mmsa.evaluation import evaluate_checkpoint, save_results
    from .mmsa.run import dict_to_str

    out = Path(ns.out or DEFAULT_TEST_OUT.format(dataset=ns.dataset.lower()))
    if out.suffix.lower() != ".csv":
        parser.error(f"--out {out}: results are written as CSV; give a .csv file")
    if not Path(ns.checkpoint).is_file():
        parser.error(f"--checkpoint {ns.checkpoint}: no such file")
    try:
        results, args = evaluate_checkpoint(ns.checkpoint, ns.dataset, ns.config, model=ns.model, split=ns.split,
                                            missing_rate=ns.missing_rate, gpu_ids=ns.gpu_ids,
                                            num_workers=ns.num_workers, default_config=merged_config_file())
    except (ValueError, KeyError, FileNotFoundError) as error:
        _fail(parser, error)
    print(f"{args['model_name']} on {args['dataset_name']} {ns.split} ({feature_file(args)}): "
          f"{dict_to_str(results)}")
    save_results(out, results, checkpoint=ns.checkpoint, args=args, split=ns.split, missing_rate=ns.missing_rate)
    print(f"a row added to {out}")


def model_names() -> tuple[list[str], list[str]]:
    """(mmsa-emt's models, MMSA's models) by their display names."""
    from .mmsa.models import display_name, mmsa_model_names
    from .registry import list_models

    return [display_name(m) for m in list_models()], mmsa_model_names()


def run_list(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .settings import SETTINGS, groups

    ours, theirs = model_names()
    print("models (mmsa-emt): " + ", ".join(ours))
    print("models (MMSA):     " + ", ".join(theirs))
    from .configs import merged_config_file

    path = Path(ns.config) if ns.config else merged_config_file()
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    raw = json.loads(path.read_text(encoding="utf-8"))
    datasets = [k for k in raw.get("datasetCommonParams", {}) if k != "dataset_root_dir"]
    print(f"datasets of {path}: " + ", ".join(datasets))
    print(f"models with an entry in {path}: " + ", ".join(k for k in raw if k != "datasetCommonParams"))
    print("\nEMT-DLFR config keys (default; 'required': the config must give it; docs/configuration.md explains "
          "each):")
    width = max(len(k) for k in SETTINGS)
    for group in groups():
        print(f"  [{group}]")
        for setting in (s for s in SETTINGS.values() if s.group == group):
            print(f"    {setting.name:<{width}}  {setting.default_text}")
