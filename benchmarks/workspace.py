"""A throw-away MMSA workspace for the benchmark scripts: synthetic features in MMSA's .pkl format and a copy of
the repository's config pointing at them (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def resolve_device(choice: str) -> str:
    """A benchmark's ``--device``: 'auto' is CUDA when there is one, else the CPU."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bert_base(folder: Path) -> str:
    """A bert-base-uncased-sized encoder with random weights and a small vocab.txt (nothing downloaded): the same
    compute and parameter count as the real one. The weights are seeded, so runs report the same losses."""
    import torch
    from transformers import BertConfig, BertModel

    from mmsa_emt.synthetic import tokenizer_vocab

    if not (folder / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertModel(BertConfig())
        model.save_pretrained(folder)
        (folder / "vocab.txt").write_text("\n".join(tokenizer_vocab()) + "\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                  "do_lower_case": True}))
    return str(folder)


def write_workspace(folder: Path, *, encoder: str, dataset: str = "mosi", data: dict[str, Any] | None = None,
                    common: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> Path:
    """Writes ``folder/dataset/<MMSA's feature path>`` (``synthetic.write_dataset(dataset, **data)``, tokenized
    with ``encoder``'s vocabulary) and ``folder/config.json``: the package's regression config (merged into
    MMSA's) with the EMT-DLFR entry updated by ``common`` (commonParams) and ``model`` (datasetParams[dataset]);
    returns the config's path."""
    from mmsa_emt.configs import merged_config  # here, not at the top: resolve_device's users start in 2 s, not 8
    from mmsa_emt.synthetic import write_dataset

    config = merged_config()
    config["datasetCommonParams"]["dataset_root_dir"] = "dataset"  # relative to the config file
    feature_file = folder / "dataset" / config["datasetCommonParams"][dataset]["unaligned"]["featurePath"]
    if not feature_file.exists():
        write_dataset(feature_file, dataset, tokenizer=encoder, **(data or {}))
    entry = config["emt-dlfr"]
    entry["commonParams"].update(common or {})
    entry["datasetParams"][dataset].update({"pretrained": encoder, **(model or {})})
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path
