"""Command line: ``python -m mmsa_emt <command>``; ``--help`` lists the commands."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "config_regression.json"
BERT_BASE_VOCAB = {"bert-base-uncased": 30522, "bert-base-chinese": 21128}
FEATURE_DIMS = {"mosi": [768, 5, 20], "mosei": [768, 74, 35], "sims": [768, 33, 709]}  # MMSA's feature files


def parameter_table(config_file: str | Path, datasets: Sequence[str]) -> pd.DataFrame:
    """Parameters per part of EMT-DLFR for each dataset's config, with a randomly initialised bert-base-sized
    encoder built locally (same architecture and size as the real checkpoint, nothing downloaded)."""
    from transformers import BertConfig, BertModel

    from .mmsa_compat import AMIO, load_config

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
    parser = argparse.ArgumentParser(prog="python -m mmsa_emt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="print EMT-DLFR's parameter count per part for each dataset")
    params.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (default: %(default)s)")
    params.add_argument("--datasets", nargs="+", default=["mosi", "mosei", "sims"])
    args = parser.parse_args(argv)

    if args.command == "params":
        table = parameter_table(args.config, args.datasets)
        print(table.to_string(formatters={c: "{:,}".format for c in table.columns}))
        print("The BERT pooler is counted (as in the authors' code) but frozen: neither implementation uses it.")
