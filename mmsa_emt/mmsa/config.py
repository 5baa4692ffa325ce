"""MMSA's config files read (``load_config``) and MMSA's args translated into one ``RunConfig`` (``translate``).

MMSA hands every model one flat dict of settings (its "args") merged from a config file. ``load_config`` reads
that file as MMSA does, with model aliases, errors naming the entry or key at fault, and paths resolved against
the config file's own folder. ``translate`` is the one place where MMSA's key names become our dataclasses'
fields: every value is read through ``mmsa_emt.settings`` (checked, and defaulted from the field that owns it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from easydict import EasyDict
from MMSA.config import get_config_regression as _mmsa_config_regression
from MMSA.config import get_config_tune as _mmsa_config_tune

from .. import configs, fast, settings
from ..dlfr import LossWeights
from ..fast import SpeedConfig
from ..model import EMTDLFRConfig
from ..registry import canonical_name
from ..trainer import OptimConfig
from .run_config import RunConfig, TrainingConfig

# MMSA's key -> (dataclass, field) for every setting read as one field; ``translate`` fills the dataclasses from it
# and ``settings.SETTINGS`` takes the defaults of these keys from these fields.
ARGS_FIELDS: dict[str, tuple[type, str]] = {
    **{key: (EMTDLFRConfig, field) for key, field in (
        ("pretrained", "pretrained"), ("use_finetune", "finetune_bert"),
        ("a_lstm_hidden_size", "audio_hidden"), ("v_lstm_hidden_size", "vision_hidden"),
        ("a_lstm_layers", "audio_lstm_layers"), ("v_lstm_layers", "vision_lstm_layers"),
        ("a_lstm_dropout", "audio_lstm_dropout"), ("v_lstm_dropout", "vision_lstm_dropout"),
        ("audio_out", "audio_out"), ("video_out", "vision_out"), ("d_model", "d_model"),
        ("fusion_layers", "fusion_layers"), ("heads", "heads"), ("ff_expansion", "ff_expansion"),
        ("emb_dropout", "emb_dropout"), ("attn_dropout", "attn_dropout"), ("ff_dropout", "ff_dropout"),
        ("learnable_pos_emb", "learnable_pos_emb"), ("max_seq_len", "max_seq_len"), ("mpu_share", "mpu_share"),
        ("modality_share", "modality_share"), ("layer_share", "layer_share"), ("attn_act_fn", "pool_activation"),
        ("post_fusion_dim", "post_fusion_dim"), ("post_fusion_dropout", "post_fusion_dropout"),
        ("modalities", "modalities"))},
    **{f"learning_rate_{part}": (OptimConfig, f"lr_{field}") for part, field in
       (("bert", "bert"), ("audio", "audio"), ("video", "vision"), ("other", "other"))},
    **{f"weight_decay_{part}": (OptimConfig, f"wd_{field}") for part, field in
       (("bert", "bert"), ("audio", "audio"), ("video", "vision"), ("other", "other"))},
    "loss_attra_weight": (LossWeights, "attraction"), "loss_recon_weight": (LossWeights, "reconstruction"),
    "recon_loss": (LossWeights, "recon_kind"),
    "KeyEval": (TrainingConfig, "key_eval"), "early_stop": (TrainingConfig, "early_stop"),
    "max_epochs": (TrainingConfig, "max_epochs"), "update_epochs": (TrainingConfig, "update_epochs"),
    "authors_training": (TrainingConfig, "authors_training"), "verbose_level": (TrainingConfig, "verbose_level"),
}
# fields filled from several keys or from part of one: EMTDLFRConfig field -> MMSA's keys
CHECKPOINT_FIELDS = ("encoder_config",)  # EMTDLFRConfig fields a checkpoint sets, never MMSA's args
DERIVED_FIELDS: dict[str, tuple[str, ...]] = {
    "audio_dim": ("feature_dims",), "vision_dim": ("feature_dims",),  # feature_dims[1], feature_dims[2]
    "predictor_dims": ("gmc_tokens_pred_dim", "text_pred_dim", "audio_pred_dim", "video_pred_dim"),
}


def _mmsa_default_config(tune: bool) -> Path:
    """The config read when none is given: the installed MMSA's, with mmsa-emt's entries merged in (``configs``)."""
    return configs.merged_config_file(tune)


def load_config(model_name: str, dataset_name: str, config_file: str | os.PathLike = "", *,
                tune: bool = False) -> EasyDict:
    """MMSA's ``get_config_regression``/``get_config_tune`` with model aliases, clear errors for unknown names
    and ``dataset_root_dir`` resolved against the config file's own folder when it is relative."""
    path = Path(config_file) if str(config_file) else _mmsa_default_config(tune)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    name = canonical_name(model_name) or model_name.lower()
    dataset = dataset_name.lower()
    models = sorted(k for k in raw if k != "datasetCommonParams")
    if name not in raw:
        hint = (f" ({name} is an mmsa-emt model: give no config_file to read mmsa-emt's entries merged into "
                "MMSA's config, or write a complete one to edit with 'python -m mmsa_emt write-configs')"
                ) if canonical_name(name) else ""
        raise KeyError(f"model '{model_name}' has no entry in {path}; it has: {', '.join(models)}{hint}")
    datasets = raw.get("datasetCommonParams", {})
    if dataset not in datasets:
        known = sorted(k for k in datasets if k != "dataset_root_dir")
        raise KeyError(f"dataset '{dataset_name}' has no entry in {path} under datasetCommonParams; "
                       f"it has: {', '.join(known)}")
    if not tune and dataset not in raw[name].get("datasetParams", {}):
        raise KeyError(f"model '{name}' in {path} has no datasetParams for '{dataset}'; "
                       f"it has: {', '.join(sorted(raw[name].get('datasetParams', {})))}")
    if tune and "debugParams" not in raw[name]:
        raise KeyError(f"model '{name}' in {path} has no debugParams (the search space) for tuning")
    if canonical_name(name):
        _check_entry_keys(raw[name], name, dataset, path, tune=tune)
    reader = _mmsa_config_tune if tune else _mmsa_config_regression
    args = reader(name, dataset, str(path))

    root = datasets.get("dataset_root_dir", "")
    layout = "aligned" if raw[name]["commonParams"].get("need_data_aligned") and "aligned" in datasets[dataset] \
        else "unaligned"
    relative = datasets[dataset][layout]["featurePath"]
    feature_path = Path(os.path.join(root, relative)).expanduser()
    if not feature_path.is_absolute():
        feature_path = Path(os.path.normpath(path.resolve().parent / feature_path))
    args["featurePath"] = str(feature_path)
    args["config_file"] = str(path)
    args["feature_hint"] = (f"built from datasetCommonParams.dataset_root_dir='{root}' + "
                            f"datasetCommonParams.{dataset}.{layout}.featurePath='{relative}' in {path}"
                           + ("" if str(config_file) else ", MMSA's config with mmsa-emt's entries merged in: for "
                              "your data folder pass a config written by 'python -m mmsa_emt write-configs'"))
    return args


def _check_entry_keys(entry: Mapping[str, Any], name: str, dataset: str, path: Path, *, tune: bool) -> None:
    """Keys of an mmsa-emt model's entry that ``settings.SETTINGS`` does not know are an error naming the section and
    the closest known key (MMSA would pass a misspelt key on, and the model would read its default instead)."""
    sections = {"commonParams": entry.get("commonParams", {}),
                f"datasetParams.{dataset}": entry.get("datasetParams", {}).get(dataset, {})}
    if tune:
        debug = dict(entry.get("debugParams", {}))
        sampled = debug.pop("d_paras", [])  # the names of the keys a trial samples, and their choices
        sections["debugParams"] = {**debug, **dict.fromkeys(sampled)}
    for section, keys in sections.items():
        settings.check_entry(keys, f"{path} ({name}.{section})")


def _config_regression(model_name: str, dataset_name: str, config_file: str = "") -> EasyDict:
    """MMSA_run's reader; MMSA's own default (what it passes when given no file) reads the merged config."""
    return load_config(model_name, dataset_name, "" if configs.is_mmsa_default(config_file) else config_file)


def _config_tune(model_name: str, dataset_name: str, config_file: str = "", random_choice: bool = True) -> EasyDict:
    return load_config(model_name, dataset_name, "" if configs.is_mmsa_default(config_file, True) else config_file,
                       tune=True)


def make_args(values: Mapping[str, Any]) -> EasyDict:
    """MMSA's args bag (an ``EasyDict``, read by attribute and by key) holding ``values``."""
    return EasyDict(values)


def key_eval(args: Mapping[str, Any]) -> str:
    """The validation result that picks the best epoch (MMSA's ``KeyEval``; the table's default when absent)."""
    return str(settings.get(args, "KeyEval"))


def feature_file(args: Mapping[str, Any]) -> Path:
    """The feature file a run reads (MMSA's ``featurePath``, absolute once ``load_config`` built it)."""
    return Path(settings.get(args, "featurePath"))


def is_ours(args: Mapping[str, Any]) -> bool:
    """True when ``args`` name a model registered by mmsa-emt (EMT-DLFR), False for MMSA's own models."""
    return canonical_name(str(args.get("model_name"))) is not None


def _fields(args: Mapping[str, Any], config: type) -> dict[str, Any]:
    """The fields of ``config`` that ``ARGS_FIELDS`` maps from MMSA's keys, read through the settings table."""
    return {field: settings.get(args, key) for key, (owner, field) in ARGS_FIELDS.items() if owner is config}


def device_of(args: Mapping[str, Any]) -> torch.device:
    """The run's device (``device``, set by MMSA_run from gpu_ids; null: the CPU)."""
    return torch.device(settings.get(args, "device") or "cpu")


def model_config_from_args(args: Mapping[str, Any]) -> EMTDLFRConfig:
    """MMSA args (the authors' key names) -> explicit network config."""
    values = _fields(args, EMTDLFRConfig)
    feature_dims = settings.get(args, "feature_dims")
    return EMTDLFRConfig(**{
        **values, "modalities": tuple(values["modalities"]),
        "audio_dim": feature_dims[1], "vision_dim": feature_dims[2],
        "predictor_dims": {name: settings.get(args, key) for name, key in zip(
            ("context", "text", "audio", "vision"), DERIVED_FIELDS["predictor_dims"], strict=True)},
    })


def optim_config_from_args(args: Mapping[str, Any]) -> OptimConfig:
    """MMSA args -> learning rates and weight decays per parameter group."""
    return OptimConfig(**_fields(args, OptimConfig))


def speed_config_from_args(args: Mapping[str, Any]) -> SpeedConfig:
    """How to compute (``mmsa_emt.fast``): ``speed`` ('fast' | 'faithful') names the preset and the lever keys
    present (``fast.LEVERS``: fused_attention, precision, ...) override it; 'auto' values follow ``device``."""
    return fast.from_settings(args, device_of(args))


def loss_weights_from_args(args: Mapping[str, Any]) -> LossWeights:
    """MMSA args -> the weights of DLFR's loss terms (Eqs. 11, 13)."""
    return LossWeights(**_fields(args, LossWeights))


def training_config_from_args(args: Mapping[str, Any]) -> TrainingConfig:
    """MMSA args -> the settings of MMSA's trainer interface."""
    return TrainingConfig(**_fields(args, TrainingConfig))


def translate(args: Mapping[str, Any]) -> RunConfig:
    """MMSA's args -> everything one run of EMT-DLFR reads from them (the one translation of MMSA's key names)."""
    return RunConfig(model=model_config_from_args(args), optim=optim_config_from_args(args),
                     loss=loss_weights_from_args(args), speed=speed_config_from_args(args),
                     training=training_config_from_args(args), device=device_of(args))


def _set_device_if_cuda(device: Any) -> None:
    """``torch.cuda.set_device`` for CUDA devices; a no-op for the CPU (MMSA calls it unconditionally)."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)


def trial_args(model_name: str, dataset_name: str, config_file: str | os.PathLike, *,
               overrides: Mapping[str, Any] | None = None, gpu_ids: Sequence[int] = ()) -> EasyDict:
    """The args ``MMSA_run`` would build for one run, plus ``overrides``, checked (``check_args``)."""
    args = load_config(model_name, dataset_name, config_file)
    args.update(dict(overrides or {}))
    args.update(device=settings.checked_assign_gpu(gpu_ids), train_mode="regression", custom_feature=None,
                feature_T=None, feature_A=None, feature_V=None, cur_seed=1)
    check_args(args)
    return args


def check_args(args: EasyDict) -> None:
    """Every setting checked before the first batch: ``settings.check_args`` for ours (every key) or MMSA's
    models (the keys all its trainers share)."""
    settings.check_args(args, ours=is_ours(args))
