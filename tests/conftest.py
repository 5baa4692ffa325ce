"""Shared fixtures: a tiny local BERT, tiny model configs, random two-view batches, MMSA workspaces."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: a hub name must fail fast, not retry

import mmsa_emt
from mmsa_emt.dlfr import TwoViewBatch
from mmsa_emt.model import EMTDLFRConfig
from mmsa_emt.synthetic import write_dataset, write_tiny_bert

REPO = Path(__file__).resolve().parents[1]
FEATURE_FILES = {"mosi": "MOSI/Processed/unaligned_50.pkl", "mosei": "MOSEI/Processed/unaligned_50.pkl",
                 "sims": "SIMS/Processed/unaligned_39.pkl"}
TINY_SHAPES = {"text_len": 16, "audio_len": 12, "vision_len": 10, "text_feature_dim": 16}
TINY_MODEL = {"d_model": 16, "a_lstm_hidden_size": 8, "v_lstm_hidden_size": 8, "post_fusion_dim": 16,
              "batch_size": 8, "fusion_layers": 2}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def tiny_config(tiny_bert: Path) -> Callable[..., EMTDLFRConfig]:
    def make(**overrides) -> EMTDLFRConfig:
        base = dict(pretrained=str(tiny_bert), audio_dim=5, vision_dim=7, audio_hidden=8, vision_hidden=8,
                    audio_out=4, vision_out=6, d_model=16, fusion_layers=2, heads=2, post_fusion_dim=8,
                    predictor_dims={"context": 8, "text": 8, "audio": 2, "vision": 3})
        return EMTDLFRConfig(**{**base, **overrides})

    return make


def random_batch(b: int = 3, *, text_len: int = 10, audio_len: int = 12, vision_len: int = 9, audio_dim: int = 5,
                 vision_dim: int = 7, rate: float = 0.5, seed: int = 0, vocab: int = 200) -> TwoViewBatch:
    """A two-view batch shaped like MMSA's, with varied lengths and a random missing pattern at ``rate``."""
    g = torch.Generator().manual_seed(seed)
    text_lengths = torch.randint(3, text_len + 1, (b,), generator=g)
    text_lengths[0] = text_len
    mask = (torch.arange(text_len)[None] < text_lengths[:, None]).float()  # (b, l)
    ids = torch.randint(110, vocab, (b, text_len), generator=g).float() * mask
    ids[:, 0] = 101
    ids[torch.arange(b), text_lengths - 1] = 102
    audio_lengths = torch.randint(1, audio_len + 1, (b,), generator=g)
    vision_lengths = torch.randint(1, vision_len + 1, (b,), generator=g)
    audio_lengths[0], vision_lengths[-1] = audio_len, vision_len
    audio_valid = (torch.arange(audio_len)[None] < audio_lengths[:, None]).float()
    vision_valid = (torch.arange(vision_len)[None] < vision_lengths[:, None]).float()
    audio = torch.randn(b, audio_len, audio_dim, generator=g) * audio_valid[..., None]
    vision = torch.randn(b, vision_len, vision_dim, generator=g) * vision_valid[..., None]

    def keep(valid: torch.Tensor) -> torch.Tensor:
        return (torch.rand(valid.shape, generator=g) > rate).float() * valid

    text_keep = keep(mask)
    text_keep[:, 0] = 1
    text_keep[torch.arange(b), text_lengths - 1] = 1  # [CLS]/[SEP] are never dropped
    audio_keep, vision_keep = keep(audio_valid), keep(vision_valid)
    text = torch.stack([ids, mask, torch.zeros_like(mask)], dim=1)  # (b, 3, l)
    text_m = text.clone()
    text_m[:, 0] = ids * text_keep + 100 * (mask - text_keep)
    return TwoViewBatch(text=text, text_m=text_m, audio=audio, audio_m=audio * audio_keep[..., None],
                        vision=vision, vision_m=vision * vision_keep[..., None], audio_lengths=audio_lengths,
                        vision_lengths=vision_lengths, text_dropped=mask - text_keep,
                        audio_dropped=audio_valid - audio_keep, vision_dropped=vision_valid - vision_keep,
                        labels=torch.randn(b, generator=g))


@pytest.fixture
def workspace(tmp_path: Path, tiny_bert: Path) -> Callable[..., Path]:
    """Writes synthetic MMSA data for a preset and a config file pointing at it; returns the config path."""

    def make(preset: str = "mosi", *, scale: float = 0.03, seed: int = 0, model: dict | None = None,
             common: dict | None = None, tune: bool = False, **data_kwargs) -> Path:
        data = tmp_path / "dataset" / FEATURE_FILES[preset]
        if not data.exists():
            write_dataset(data, preset, tokenizer=str(tiny_bert), scale=scale, seed=seed,
                          **{**TINY_SHAPES, **data_kwargs})
        kind = "tune" if tune else "regression"
        config = json.loads((REPO / "config" / f"config_{kind}.json").read_text())
        config["datasetCommonParams"]["dataset_root_dir"] = "dataset"  # relative to the config file
        entry = config["emt-dlfr"]
        entry["commonParams"].update({"max_epochs": 2, "early_stop": 2, "update_epochs": 2, **(common or {})})
        entry["datasetParams"][preset].update({**TINY_MODEL, "pretrained": str(tiny_bert), **(model or {})})
        path = tmp_path / f"config_{kind}.json"
        path.write_text(json.dumps(config))
        return path

    return make


def run_dirs(tmp_path: Path) -> dict[str, Path]:
    return {"model_save_dir": tmp_path / "models", "res_save_dir": tmp_path / "results", "log_dir": tmp_path / "logs"}


__all__ = ["FEATURE_FILES", "REPO", "build_model", "mmsa_emt", "random_batch", "run_dirs"]


class OpCount(TorchDispatchMode):
    """Counts the ATen operations run inside it, views left out (they launch nothing): ``with OpCount() as ops``,
    then ``ops.n``."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def build_model(tiny_config: Callable[..., EMTDLFRConfig], speed=None, device: str = "cpu", **settings):
    """A tiny EMT-DLFR built the paper's way (``DLFR(EMTDLFR(config))``), then made to compute per ``speed`` (a
    preset name or a ``fast.SpeedConfig``; default: its field defaults) with the lever keys among ``settings``
    overriding it; the other settings go to the network config."""
    from mmsa_emt.dlfr import emt_dlfr
    from mmsa_emt.fast import LEVERS, REMOVED, SpeedConfig, apply, speed_config

    levers = {k: settings.pop(k) for k in list(settings) if k in LEVERS or k in REMOVED}
    return apply(emt_dlfr(tiny_config(**settings)), speed_config(speed or SpeedConfig(), **levers), device)
