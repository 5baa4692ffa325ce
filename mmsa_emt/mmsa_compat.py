"""The only module that knows MMSA 2.2.1: its args bag, names, config layout, data loader, trainer interface.

``register()`` hooks EMT-DLFR into ``MMSA_run``/``MMSA_test`` from outside, without editing MMSA's files: MMSA
builds its model and trainer maps inside ``AMIO.__init__``/``ATIO.__init__`` and looks ``AMIO``, ``ATIO``,
``MMDataLoader`` and the config readers up as globals of ``MMSA.run`` at call time, so replacing those globals with
subclasses/wrappers that know our models is enough. The same globals carry the mends MMSA 2.2.1 needs today:
no ``torch.cuda.set_device`` on a CPU device, plain numbers (not ``np.float64(...)`` text) in the results CSV under
numpy 2, one results CSV that keeps every model's rows (``append_results``), config paths relative to the config
file, feature files checked before use, per-seed checkpoints reserved at once that never overwrite earlier ones,
``MMSA_test`` loading our weights strictly and reading a sample up to its lengths (``mmsa_test``), one set of log
handlers however often ``MMSA_run`` is called, datasets beyond MMSA's three (``mmsa_emt.metrics``), and MMSA's own
baselines made to run offline with a local encoder of any width.
It also runs one train-and-test trial at given missing rates for ``mmsa_emt.robustness``.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import functools
import importlib
import json
import logging
import math
import os
import pickle
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import MMSA
import MMSA.data_loader as mmsa_data_loader
import MMSA.run as mmsa_run
import numpy as np
import pandas as pd
import torch
from easydict import EasyDict
from filelock import FileLock
from MMSA.config import get_config_regression as _mmsa_config_regression
from MMSA.config import get_config_tune as _mmsa_config_tune
from MMSA.data_loader import MMDataLoader as _mmsa_data_loader
from MMSA.data_loader import MMDataset
from MMSA.models.AMIO import AMIO as _MMSA_AMIO
from MMSA.models.missingTask.TFR_NET.model import TFR_NET as MMSA_TFR_NET
from MMSA.models.singleTask.MISA import MISA as MMSA_MISA
from MMSA.trains.ATIO import ATIO as _MMSA_ATIO
from MMSA.utils import MetricsTop, dict_to_str, setup_seed
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader

from . import dlfr as _dlfr  # noqa: F401  (registers the models)
from . import checkpoint as checkpoint_format
from . import fast, settings
from .checkpoint import CheckpointError
from .data_check import FeatureReport, check_feature_file, load_feature_file, zero_nonfinite
from .fast import SpeedConfig
from .metrics import DATASET_METRICS
from .missing import incomplete_view_file
from .model import EMTDLFRConfig
from .normalize import normalize_features, normalize_setting, normalized_file
from .dlfr import DLFR, LossWeights, TwoViewBatch, upgrade_state_dict
from .registry import canonical_name, get_builder, list_models
from .trainer import OptimConfig, build_optimizer, evaluate, fit

logger = logging.getLogger("MMSA")
MMSA_UNK_ID = 100  # MMSA's data_missing writes this id for every dropped token
MINIMIZED_KEYS = ("Loss", "Loss(pred_m)", "MAE", "RMSE")
MMSA_DATASETS = ("mosi", "mosei", "sims")  # the names MMSA's MMDataset and MetricsTop know
DEFAULT_MISSING_SEEDS = tuple(settings.SETTINGS["missing_seed"].default)  # the authors' per-modality seeds
SIMS_LABEL_KEYS = ("regression_labels_T", "regression_labels_A", "regression_labels_V")


# ----------------------------------------------------------------------------------------------- configs
def _mmsa_default_config(tune: bool) -> Path:
    return Path(MMSA.__file__).parent / "config" / ("config_tune.json" if tune else "config_regression.json")


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
        hint = (f" ({name} is an mmsa-emt model: pass config_file='config/config_regression.json' or "
                "'config/config_tune.json' from the mmsa-emt repository)") if canonical_name(name) else ""
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
                            f"datasetCommonParams.{dataset}.{layout}.featurePath='{relative}' in {path}")
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
    return load_config(model_name, dataset_name, config_file)


def _config_tune(model_name: str, dataset_name: str, config_file: str = "", random_choice: bool = True) -> EasyDict:
    return load_config(model_name, dataset_name, config_file, tune=True)


def _is_ours(args: Mapping[str, Any]) -> bool:
    return canonical_name(str(args.get("model_name", ""))) is not None


def model_config_from_args(args: Mapping[str, Any]) -> EMTDLFRConfig:
    """MMSA args (the authors' key names) -> explicit network config; values checked and defaults taken from
    ``settings.SETTINGS``."""
    r = functools.partial(settings.get, args)
    feature_dims = r("feature_dims")
    return EMTDLFRConfig(
        pretrained=str(r("pretrained")), audio_dim=feature_dims[1], vision_dim=feature_dims[2],
        finetune_bert=r("use_finetune"),
        audio_hidden=r("a_lstm_hidden_size"), vision_hidden=r("v_lstm_hidden_size"),
        audio_lstm_layers=r("a_lstm_layers"), vision_lstm_layers=r("v_lstm_layers"),
        audio_lstm_dropout=r("a_lstm_dropout"), vision_lstm_dropout=r("v_lstm_dropout"),
        audio_out=r("audio_out"), vision_out=r("video_out"), d_model=r("d_model"), fusion_layers=r("fusion_layers"),
        heads=r("heads"), ff_expansion=r("ff_expansion"), emb_dropout=r("emb_dropout"),
        attn_dropout=r("attn_dropout"), ff_dropout=r("ff_dropout"),
        learnable_pos_emb=r("learnable_pos_emb"), max_seq_len=r("max_seq_len"),
        mpu_share=r("mpu_share"), modality_share=r("modality_share"), layer_share=r("layer_share"),
        pool_activation=r("attn_act_fn"), post_fusion_dim=r("post_fusion_dim"),
        post_fusion_dropout=r("post_fusion_dropout"),
        predictor_dims={"context": r("gmc_tokens_pred_dim"), "text": r("text_pred_dim"),
                        "audio": r("audio_pred_dim"), "vision": r("video_pred_dim")},
        modalities=tuple(r("modalities")),
    )


def optim_config_from_args(args: Mapping[str, Any]) -> OptimConfig:
    r = functools.partial(settings.get, args)
    return OptimConfig(lr_bert=r("learning_rate_bert"), lr_audio=r("learning_rate_audio"),
                       lr_vision=r("learning_rate_video"), lr_other=r("learning_rate_other"),
                       wd_bert=r("weight_decay_bert"), wd_audio=r("weight_decay_audio"),
                       wd_vision=r("weight_decay_video"), wd_other=r("weight_decay_other"))


def speed_config_from_args(args: Mapping[str, Any]) -> SpeedConfig:
    """How to compute (``mmsa_emt.fast``): ``speed`` ('fast' | 'faithful') names the preset and the lever keys
    present (``fast.LEVERS``: fused_attention, precision, ...) override it; 'auto' values follow ``device``."""
    return fast.from_settings(args, args.get("device", "cpu"))


def loss_weights_from_args(args: Mapping[str, Any]) -> LossWeights:
    r = functools.partial(settings.get, args)
    return LossWeights(attraction=r("loss_attra_weight"), reconstruction=r("loss_recon_weight"),
                       recon_kind=r("recon_loss"))


# ----------------------------------------------------------------------------------------------- data
def _check_missing_settings(args: EasyDict) -> None:
    """EMT-DLFR needs MMSA's data_missing machinery: one rate in [0, 1] and one seed per modality (the table's
    checks, ``settings.SETTINGS``; a rate given once counts for all three modalities)."""
    args["data_missing"] = settings.get(args, "data_missing")
    args["missing_rate"] = settings.get(args, "missing_rate")
    args["missing_seed"] = settings.get(args, "missing_seed") or list(DEFAULT_MISSING_SEEDS)


def _check_vocabulary(args: EasyDict, max_token_id: int | None, feature_path: str) -> None:
    """A local encoder must share the ids the features were tokenized with, and MMSA's [UNK] id."""
    folder = Path(str(args.get("pretrained", ""))).expanduser()
    vocab, config = folder / "vocab.txt", folder / "config.json"
    if vocab.is_file():
        tokens = vocab.read_text(encoding="utf-8").splitlines()
        unk = tokens.index("[UNK]") if "[UNK]" in tokens else None
        if unk != MMSA_UNK_ID:
            raise ValueError(f"{vocab} puts [UNK] at id {unk}, but MMSA's data_missing writes id {MMSA_UNK_ID} for "
                             "dropped tokens: use a BERT vocabulary with [UNK] at 100 (bert-base-uncased/-chinese)")
    if config.is_file() and max_token_id is not None:
        vocab_size = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
        if vocab_size is not None and max_token_id >= vocab_size:
            raise ValueError(f"{feature_path}: text_bert holds token id {max_token_id}, beyond the vocabulary of "
                             f"pretrained='{folder}' ({vocab_size} tokens): the features were tokenized with "
                             "another vocabulary")


def _feature_path(args: Mapping[str, Any]) -> str:
    """The feature file MMSA's datasets read: ``custom_feature`` if set, else ``featurePath``."""
    return str(args.get("custom_feature") or args["featurePath"])


def _check_inputs(args: EasyDict, data: Any) -> FeatureReport:
    """Checks the feature file's content ``data`` (and, for our models, the missing-data settings and the
    vocabulary)."""
    path = _feature_path(args)
    extra = SIMS_LABEL_KEYS if args["dataset_name"] == "sims" else ()
    report = check_feature_file(path, use_bert=bool(args.get("use_bert")),
                                need_lengths=not args.get("need_data_aligned"), extra_label_keys=extra,
                                config_hint=args.get("feature_hint", ""), data=data)
    for key in ("feature_T", "feature_A", "feature_V"):
        if args.get(key) and not Path(args[key]).is_file():
            raise FileNotFoundError(f"{key}='{args[key]}' does not exist")
    if _is_ours(args):
        _check_missing_settings(args)
        _check_vocabulary(args, report.max_token_id, str(path))
    return report


class _MMDataset(MMDataset):
    """MMSA's dataset for any dataset name: a name MMSA does not know (e.g. 'avec2019') loads like MOSI, whose
    file layout every MMSA feature file shares (MMSA raises KeyError for it)."""

    def __init__(self, args: EasyDict, mode: str = "train") -> None:
        if args["dataset_name"] in MMSA_DATASETS:
            super().__init__(args, mode)
            return
        self.mode, self.args = mode, args
        self._MMDataset__init_mosi()


_ORIGINAL_GET_METICS = MetricsTop.getMetics


def _get_metics(self: MetricsTop, dataset_name: str):
    """MMSA's metric lookup, extended with the datasets of ``mmsa_emt.metrics`` (for every trainer)."""
    extra = DATASET_METRICS.get(dataset_name.lower())
    return extra if extra is not None else _ORIGINAL_GET_METICS(self, dataset_name)


def _mend_datasets(args: EasyDict, report: FeatureReport, datasets: list[MMDataset]) -> None:
    """Zeroes non-finite audio/vision for our models (one warning); MMSA handles only -inf in audio."""
    if not report.nonfinite:
        return
    where = ", ".join(f"{split}/{key}: {n}" for (split, key), n in report.nonfinite.items())
    ours = _is_ours(args)
    action = "zeroed" if ours else "left to MMSA (which zeroes only -inf in audio)"
    warnings.warn(f"{report.path}: NaN/inf values in {where}; {action}", stacklevel=3)
    if ours:
        for dataset in datasets:
            for name in ("audio", "vision", "audio_m", "vision_m"):
                if getattr(dataset, name, None) is not None:
                    setattr(dataset, name, zero_nonfinite(getattr(dataset, name)))


@contextmanager
def _unpickled_once(path: str, data: Any) -> Iterator[None]:
    """Within the block MMSA's datasets, which unpickle the whole feature file once per split, are handed ``data``,
    the file's content loaded once, when they open ``path`` (MMSA copies what it keeps and changes only its
    copies, so the splits share nothing). Other files are read as before."""
    real, target = mmsa_data_loader.pickle, os.path.realpath(path)

    class _Loaded:
        @staticmethod
        def load(file: Any, *args: Any, **kwargs: Any) -> Any:
            if os.path.realpath(getattr(file, "name", "")) == target:
                return data
            return real.load(file, *args, **kwargs)

    mmsa_data_loader.pickle = _Loaded
    try:
        yield
    finally:
        mmsa_data_loader.pickle = real


def _read_features(args: Mapping[str, Any]) -> Any:
    return load_feature_file(_feature_path(args), config_hint=args.get("feature_hint", ""))


def _normalized_if_asked(args: Mapping[str, Any], data: Any) -> Any:
    """``data`` with audio/vision standardised by train statistics when ``normalize_features`` is true (a new
    dict: content shared between loaders is never changed, so never normalized twice); else ``data`` itself."""
    if not normalize_setting(args):
        return data
    for key in ("feature_A", "feature_V"):
        if args.get(key):
            raise ValueError(f"normalize_features=true with {key}='{args[key]}': MMSA would read those features "
                             "unnormalized from that file; normalize it with `python -m mmsa_emt normalize-features`")
    normalized, report = normalize_features(data, path=_feature_path(args))
    logger.info(report.summary())
    return normalized


@contextmanager
def _checked_features(args: EasyDict, data: Any = None, *, normalized: bool = False) -> Iterator[FeatureReport]:
    """Reads the feature file once (unless its content ``data`` is given) and checks it (see ``_check_inputs``);
    yields the report, and MMSA's datasets built within the block get that content instead of unpickling the file
    again (``_unpickled_once``), normalized first when ``normalize_features`` asks for it (unless ``normalized``
    says ``data`` already is), so MMSA's incomplete view is drawn from normalized features."""
    path = _feature_path(args)
    data = _read_features(args) if data is None else data
    report = _check_inputs(args, data)
    if not normalized:
        data = _normalized_if_asked(args, data)
    with _unpickled_once(path, data):
        yield report


def checked_data_loader(args: EasyDict, num_workers: int = 4) -> dict[str, DataLoader]:
    """MMSA's ``MMDataLoader`` after checking the input (see ``_check_inputs``), with non-finite audio/vision
    zeroed for our models, no training batch of one sample (BatchNorm cannot train on it) and, for MMSA's
    built-in models, the args mended as ``_mend_builtin_args`` says. The feature file is read once, not once for
    the check and once per split (MOSEI's unaligned file is several GB)."""
    with _checked_features(args) as report:
        loaders = _mmsa_data_loader(args, num_workers)
    _mend_datasets(args, report, [loader.dataset for loader in loaders.values()])
    train = loaders["train"]
    if len(train.dataset) % train.batch_size == 1:
        loaders["train"] = DataLoader(train.dataset, batch_size=train.batch_size, shuffle=True,
                                      num_workers=num_workers, drop_last=True)
    if not _is_ours(args):
        _mend_builtin_args(args, n_train=len(train.dataset), n_batches=len(loaders["train"]))
    return loaders


def checked_test_loader(args: EasyDict, num_workers: int = 0, *, data: Any = None,
                        normalized: bool = False) -> DataLoader:
    """The test split alone, checked and mended like ``checked_data_loader`` (the file read once, or not at all
    when its content ``data`` is given; ``normalized``: ``data`` is already normalized as the args ask)."""
    with _checked_features(args, data, normalized=normalized) as report:
        dataset = _MMDataset(args, mode="test")
    _mend_datasets(args, report, [dataset])
    return DataLoader(dataset, batch_size=args["batch_size"], shuffle=False, num_workers=num_workers)


def checked_test_loaders(args_list: Iterable[EasyDict], num_workers: int = 0) -> Iterator[DataLoader]:
    """``checked_test_loader`` for each of ``args_list``, built one at a time as they are asked for. Consecutive
    args naming the same feature file (a model tested at several missing rates) share one read of it, held until
    the next file or the end, and normalized at most once; each loader is still checked and built from its own
    args."""
    source, data = None, None
    for args in args_list:
        if (key := (_feature_path(args), normalize_setting(args))) != source:
            data = None  # the previous file's content released before the next one is read
            source, data = key, _normalized_if_asked(args, _read_features(args))
        yield checked_test_loader(args, num_workers, data=data, normalized=True)


def batch_from_mmsa(batch: Mapping[str, Any]) -> TwoViewBatch:
    """A batch of MMSA's loader (data_missing on) -> both views with their dropped-step masks."""
    if "text_m" not in batch:
        raise KeyError("the batch has no incomplete view ('text_m'): EMT-DLFR needs data_missing=true")
    text = batch["text"]
    return TwoViewBatch(
        text=text, text_m=batch["text_m"], audio=batch["audio"], audio_m=batch["audio_m"],
        vision=batch["vision"], vision_m=batch["vision_m"],
        audio_lengths=torch.as_tensor(batch["audio_lengths"]).long(),
        vision_lengths=torch.as_tensor(batch["vision_lengths"]).long(),
        text_dropped=text[:, 1] - batch["text_missing_mask"],
        audio_dropped=torch.as_tensor(batch["audio_mask"]).float() - batch["audio_missing_mask"],
        vision_dropped=torch.as_tensor(batch["vision_mask"]).float() - batch["vision_missing_mask"],
        labels=batch["labels"]["M"].reshape(-1),
    )


class _Batches:
    """Iterates an MMSA DataLoader as TwoViewBatch, remembering the sample ids seen."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader, self.ids = loader, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[TwoViewBatch]:
        self.ids = []
        for batch in self.loader:
            self.ids.extend(batch["id"])
            yield batch_from_mmsa(batch)


# ----------------------------------------------------------------------------------------------- trainer
def _checkpoint_path(args: EasyDict) -> Path:
    """Per-seed checkpoint next to MMSA's path, reserved at once: the name is created as an empty placeholder
    with an exclusive create (``O_CREAT | O_EXCL``), so an existing file is never overwritten and runs started at
    the same time with the same seed get distinct names (a counter is added). The trainer's atomic write replaces
    the placeholder with the weights."""
    if "model_save_base" not in args:
        args["model_save_base"] = str(args["model_save_path"])
    base, tag = Path(args["model_save_base"]), f"-seed{torch.initial_seed()}"
    stem = base.stem if base.stem.endswith(tag) else base.stem + tag
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base.with_name(stem + base.suffix), 1
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            path, n = base.with_name(f"{stem}-{n}{base.suffix}"), n + 1


def _drop_placeholder(path: Path) -> None:
    """Removes the checkpoint name reserved by ``_checkpoint_path`` if no weights were written into it."""
    if path.is_file() and path.stat().st_size == 0:
        path.unlink(missing_ok=True)


def _plain(results: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in results.items()}


class EMTDLFRTrainer:
    """MMSA's trainer interface (``do_train``/``do_test``) over ``mmsa_emt.trainer``."""

    def __init__(self, args: EasyDict) -> None:
        self.args = args
        self.device = torch.device(args.get("device", "cpu"))
        self.weights = loss_weights_from_args(args)
        self.key_metric = str(args.get("KeyEval", "Loss"))
        self.metric_fn = MetricsTop("regression").getMetics(args["dataset_name"])  # ours too, see _get_metics
        self.progress = int(args.get("verbose_level", 1)) > 0
        self.speed = speed_config_from_args(args)
        how = " ('auto': bf16 where the device multiplies it natively)" if args.get("precision") == "auto" else ""
        self.authors_training = settings.get(args, "authors_training")  # checked before the first batch
        if self.authors_training:  # docs/differences.md: the authors' training semantics
            if self.speed.precision != "fp32":
                how = f" (authors_training: fp32 as the authors, not precision={args.get('precision')!r})"
            self.speed = dataclasses.replace(self.speed, precision="fp32")
            logger.info("authors_training: fp32, and each epoch's last partial accumulation group dropped as the "
                        "authors' loop does")
        logger.info(f"precision {self.speed.precision} on {self.device}{how}")

    def metrics(self, preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return _plain(self.metric_fn(preds, labels))

    def do_train(self, model: nn.Module, dataloader: Mapping[str, Any], return_epoch_results: bool = False):
        net, args = model.Model, self.args
        save_path = _checkpoint_path(args)
        args["model_save_path"] = save_path  # MMSA's _run reloads the best weights from here
        history: dict[str, list] = {"train": [], "valid": [], "test": []}

        def on_epoch_end(epoch: int, train: dict[str, float], valid: dict[str, float]) -> None:
            if return_epoch_results:
                history["train"].append(train)
                history["valid"].append(valid)
                history["test"].append(self.do_test(model, dataloader["test"], mode="TEST"))

        try:
            self.speed.prepare_model(net)
            result = fit(net, _Batches(dataloader["train"]), _Batches(dataloader["valid"]),
                         optimizer=build_optimizer(net, optim_config_from_args(args)), weights=self.weights,
                         metric_fn=self.metrics, key_metric=self.key_metric,
                         minimize=self.key_metric in MINIMIZED_KEYS, early_stop=int(args.get("early_stop", 8)),
                         max_epochs=args.get("max_epochs"), update_every=int(args.get("update_epochs", 1)),
                         save_path=save_path, checkpoint_prefix="Model.", device=self.device,
                         checkpoint_meta=checkpoint_format.metadata(net, args),
                         progress=self.progress, logger=logger, on_epoch_end=on_epoch_end, speed=self.speed,
                         last_partial_group="drop" if self.authors_training else "step")
        except BaseException:
            _drop_placeholder(save_path)  # a failed run frees the name it reserved (weights written are kept)
            raise
        logger.info(f"best valid {self.key_metric} {result.best_value:.4f} at epoch {result.best_epoch}; "
                    f"weights saved to {save_path}")
        return history if return_epoch_results else None

    def do_test(self, model: nn.Module, dataloader: Any, mode: str = "VAL", return_sample_results: bool = False):
        batches = _Batches(dataloader)
        out = evaluate(model.Model, batches, self.weights, device=self.device, desc=mode.lower(),
                       progress=self.progress, keep_features=return_sample_results, speed=self.speed)
        results = {**self.metrics(out.preds, out.labels), "Loss": round(out.loss, 4),
                   "Loss(pred_m)": round(out.pred_loss, 4)}
        logger.info(f"{mode}-({self.args['model_name']}) >> {dict_to_str(results)}")
        if return_sample_results:
            f = {k: v.numpy() for k, v in out.features.items()}
            names = {"text": "Feature_t", "audio": "Feature_a", "vision": "Feature_v", "fusion": "Feature_f"}
            results.update(Ids=list(batches.ids), SResults=out.preds.numpy().tolist(), Labels=out.labels.tolist(),
                           Features={names[k]: v for k, v in f.items()})
        return results


# ----------------------------------------------------------------------------------------------- built-in models
class _ReduceLROnPlateau(ReduceLROnPlateau):
    """Accepts the ``verbose`` argument that MMSA's MulT, MMIM and TFR-Net trainers pass and torch 2.13 refuses."""

    def __init__(self, *args: Any, verbose: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def encoder_width(pretrained: Any) -> int | None:
    """hidden_size of a local encoder folder (None for a hub name)."""
    config = Path(str(pretrained or "")).expanduser() / "config.json"
    return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"]) if config.is_file() else None


def _mend_builtin_args(args: EasyDict, *, n_train: int, n_batches: int) -> None:
    """Args of MMSA's built-in models, after its loader and before the model is built:

    - the text width follows the loaded encoder (MMSA's loader forces feature_dims[0] = 768 with use_bert,
      which breaks MMIM, TFR-Net and Self_MM with a 384- or 32-wide encoder);
    - ``train_samples`` is the real training-set size (Self_MM sizes its label tables with it);
    - gradient accumulation over more batches than an epoch has would never step: capped at one epoch;
    - TFR-Net's temporal transformers take the sequence lengths as widths: they must divide by its heads.
    """
    width = encoder_width(args.get("pretrained")) if args.get("use_bert") else None
    if width is not None:
        args["feature_dims"][0] = width
        if args["model_name"] == "self_mm":
            args["text_out"] = width
    args["train_samples"] = n_train
    if int(args.get("update_epochs", 1)) > n_batches:
        logger.warning(f"update_epochs={args['update_epochs']} is more than the {n_batches} training batches of "
                       f"an epoch: MMSA's trainer would never step; using {n_batches}")
        args["update_epochs"] = n_batches
    if args["model_name"] == "tfr_net":
        heads, lengths = int(args["num_temporal_head"]), [int(n) for n in args["seq_lens"]]
        if any(n % heads for n in lengths):
            raise ValueError(f"TFR_Net uses the sequence lengths {lengths} as transformer widths with "
                             f"num_temporal_head={heads}; each must be divisible by it: set num_temporal_head to "
                             f"a common divisor, e.g. {math.gcd(*lengths)}")


class _MISA(MMSA_MISA):
    """MISA with the text projection sized from the loaded encoder (MMSA hard-codes 768) and audio/vision
    packing lengths kept within the sequences (MMSA packs them with the text token counts)."""

    def __init__(self, config: EasyDict) -> None:
        super().__init__(config)
        if config.use_bert:
            width = self.bertmodel.model.config.hidden_size
            if width != self.project_t.project_t.in_features:
                self.project_t.project_t = nn.Linear(width, config.hidden_size)

    def extract_features(self, sequence, lengths, rnn1, rnn2, layer_norm):
        return super().extract_features(sequence, lengths.clamp(min=1, max=sequence.size(1)), rnn1, rnn2,
                                        layer_norm)


class _TFRNet(MMSA_TFR_NET):
    """TFR-Net with the configured ``pretrained`` encoder (MMSA always asks the hub for bert-base-uncased)."""

    def __init__(self, args: EasyDict) -> None:
        module = importlib.import_module(MMSA_TFR_NET.__module__)
        original = module.BertTextEncoder
        module.BertTextEncoder = functools.partial(original, transformers=args.get("transformers", "bert"),
                                                   pretrained=args.get("pretrained", "bert-base-uncased"))
        try:
            super().__init__(args)
        finally:
            module.BertTextEncoder = original


def _mend_builtin_models() -> None:
    for name in ("MMSA.trains.singleTask.MULT", "MMSA.trains.singleTask.MMIM", "MMSA.trains.missingTask.TFR_NET"):
        importlib.import_module(name).ReduceLROnPlateau = _ReduceLROnPlateau
    models = importlib.import_module("MMSA.models.AMIO")  # AMIO.__init__ reads these names at call time
    models.MISA, models.TFR_NET = _MISA, _TFRNet


# ----------------------------------------------------------------------------------------------- missing-rate trials
NATIVE_MISSING = ("tfr_net",)  # MMSA's own missing-aware model: it reads MMSA's incomplete view itself


def display_name(model_name: str) -> str:
    """'emt_dlfr' -> 'EMT-DLFR', 'self_mm' -> 'Self_MM': the spelling of MMSA's model list."""
    key = canonical_name(model_name)
    if key is not None:
        return key.upper()
    known = {m.lower(): m for m in [*mmsa_run.SUPPORTED_MODELS, "TFR_Net"]}
    return known.get(model_name.lower(), model_name)


def reads_incomplete_view(model_name: str) -> bool:
    """True for models that take MMSA's data_missing view natively (ours, TFR-Net); the others are fed a derived
    feature file holding only the incomplete view (see ``mmsa_emt.missing``)."""
    return canonical_name(model_name) is not None or model_name.lower() in NATIVE_MISSING


def _at_missing_rates(args: EasyDict, rates: Sequence[float], cache_dir: Path) -> EasyDict:
    """A copy of ``args`` whose data is missing at ``rates`` (text, audio, vision)."""
    at = EasyDict(copy.deepcopy(dict(args)))
    seeds = [int(s) for s in (args.get("missing_seed") or DEFAULT_MISSING_SEEDS)]
    if reads_incomplete_view(at["model_name"]):
        at.update(data_missing=True, missing_rate=[float(r) for r in rates], missing_seed=seeds)
    else:
        source = args["featurePath"]
        if normalize_setting(args):  # normalize first, then drop, as the loader does for the other models
            source = normalized_file(source, cache_dir)
            at["normalize_features"] = False  # the derived file is normalized already
        at["featurePath"] = str(incomplete_view_file(source, rates, seeds, cache_dir))
        at["data_missing"] = False
    return at


def trial_args(model_name: str, dataset_name: str, config_file: str | os.PathLike, *,
               overrides: Mapping[str, Any] | None = None, gpu_ids: Sequence[int] = ()) -> EasyDict:
    """The args ``MMSA_run`` would build for one run, plus ``overrides``."""
    args = load_config(model_name, dataset_name, config_file)
    args.update(dict(overrides or {}))
    args.update(device=settings.checked_assign_gpu(gpu_ids), train_mode="regression", custom_feature=None,
                feature_T=None, feature_A=None, feature_V=None, cur_seed=1)
    check_args(args)
    return args


def check_args(args: EasyDict) -> None:
    """Every setting checked before the first batch: ``settings.check_args`` for ours (every key) or MMSA's
    models (the keys all its trainers share)."""
    settings.check_args(args, ours=_is_ours(args))


def _settings_checked_loader(args: EasyDict, num_workers: int = 4) -> dict[str, DataLoader]:
    """``checked_data_loader`` after ``check_args``: MMSA's ``_run`` calls its loader first, once per seed (or
    tuning trial), with the args merged from the config file and ``config=``, before any data is read or any model
    built."""
    check_args(args)
    return checked_data_loader(args, num_workers)


def run_missing_trial(args: EasyDict, *, seed: int, train_rates: Sequence[float],
                      test_rates: Sequence[Sequence[float]], checkpoint: Path, cache_dir: Path,
                      num_workers: int = 0) -> tuple[list[dict[str, float]], Path]:
    """Trains one model at ``train_rates`` with ``seed`` and tests it at each of ``test_rates``, as MMSA's
    ``_run`` does (seeding, loaders, AMIO, ATIO); returns the test results and the checkpoint written."""
    train_args = _at_missing_rates(args, train_rates, cache_dir)
    train_args["model_save_path"] = checkpoint
    checkpoint.parent.mkdir(parents=True, exist_ok=True)  # MMSA's own trainers save without creating it
    _set_device_if_cuda(train_args["device"])
    setup_seed(seed)
    loaders = checked_data_loader(train_args, num_workers)
    model = AMIO(train_args).to(train_args["device"])
    trainer = ATIO().getTrain(train_args)
    trainer.do_train(model, loaders)
    saved = Path(train_args["model_save_path"])  # our trainer picks a per-seed name that overwrites nothing
    model.load_state_dict(torch.load(saved, map_location="cpu"))
    trained_at = loaders["test"]
    del loaders  # the training and validation splits are not needed for testing

    def same(rates: Sequence[float]) -> bool:
        return [float(r) for r in rates] == [float(r) for r in train_rates]

    # the other test rates' loaders, one at a time; for our models they share one read of the feature file
    others = checked_test_loaders((_at_missing_rates(args, rates, cache_dir) for rates in test_rates
                                   if not same(rates)), num_workers)
    results = []
    for rates in test_rates:
        loader = trained_at if same(rates) else next(others)
        results.append(_plain({k: v for k, v in trainer.do_test(model, loader, mode="TEST").items()
                               if isinstance(v, (int, float))}))
    return results, saved


# ----------------------------------------------------------------------------------------------- hooks
def _load_checkpoint(f: Any, *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` whose errors name the file (``checkpoint.load_file``); a checkpoint that carries its config
    gives its state dict, as a weight-only file is (MMSA's ``_run`` reloads the best weights through this)."""
    return checkpoint_format.state_dict_of(checkpoint_format.load_file(f, *args, **kwargs), str(getattr(f, "name", f)))


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: nn.Module, state: Any, source: str = "the state dict") -> Any:
    """Loads ``state`` into ``model`` strictly: an EMT-DLFR checkpoint must hold exactly the model's keys and
    shapes. MMSA_test asks for ``strict=False``, under which a checkpoint of another model or layout would predict
    with the untouched random weights of every key it lacks."""
    state = checkpoint_format.state_dict_of(state, source)  # a checkpoint that carries its config: its weights
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict")
    state = upgrade_state_dict(dict(state), "Model." if hasattr(model, "Model") else "")  # the earlier layout
    expected, given = set(nn.Module.state_dict(model)), set(state)
    missing, unexpected = expected - given, given - expected
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys ({_few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({_few(unexpected)})" if unexpected else ""]
        hint = (" (its keys lack the 'Model.' prefix of MMSA's AMIO)"
                if unexpected and {f"Model.{k}" for k in unexpected} >= missing else "")
        inner = getattr(model, "Model", model)
        name = "EMT-DLFR" if isinstance(inner, DLFR) else type(inner).__name__
        raise CheckpointError(f"{source} does not fit this {name} model: {' and '.join(p for p in parts if p)}{hint}; it was saved from another "
                              "model or configuration")
    try:
        return nn.Module.load_state_dict(model, state, strict=True)
    except RuntimeError as error:  # shapes differ: another configuration (widths, feature dimensions)
        raise CheckpointError(f"{source} does not fit this model's configuration: {error}") from error


def _refuse_unmarked_padding(name: str, frames: Tensor, where: str) -> None:
    """No lengths were given: a trailing all-zero frame is, in MMSA's feature files, padding, and reading it as a
    real frame changes the prediction; so it is refused rather than guessed."""
    last_zero = (frames[:, -1] == 0).all(dim=-1) if frames.shape[1] else torch.zeros(0, dtype=torch.bool)
    if bool(last_zero.any()):
        rows = last_zero.nonzero()[:, 0].tolist()
        raise ValueError(f"{where}: the last frame of '{name}' is all zeros (sample(s) {rows[:5]}) and no "
                         f"{name}_lengths were given; zero frames at the end are padding in MMSA's feature files "
                         f"and would be read as real frames. Give {name}_lengths (the number of real frames; the "
                         f"full length if the zero frames are real)")


class AMIO(_MMSA_AMIO):
    """MMSA's model wrapper, extended with the registered models (state-dict keys stay 'Model.*'). For those,
    ``load_state_dict`` is always strict (``load_weights``) and ``forward`` without lengths refuses trailing
    all-zero frames (``_refuse_unmarked_padding``)."""

    _ours = False

    def __init__(self, args: EasyDict) -> None:
        if not _is_ours(args):
            super().__init__(args)
            return
        nn.Module.__init__(self)
        self._ours = True
        self.need_model_aligned = False
        config = model_config_from_args(args)
        self.Model = fast.apply(get_builder(args["model_name"])(config), speed_config_from_args(args),
                                args.get("device", "cpu"))
        text_out = args.get("text_out")
        width = self.Model.utterance_dims.get("text")
        if text_out is not None and width is not None and int(text_out) != width:
            logger.info(f"text_out={text_out} in the config; the text width follows the loaded encoder: "
                        f"{width}")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if not self._ours:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return load_weights(self, state_dict)  # strict whatever the caller asks (MMSA_test: strict=False)

    def forward(self, text_x: Tensor, audio_x: Tensor, video_x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """MMSA's inference call; for our models (text, audio, vision[, audio_lengths, vision_lengths])."""
        if not self._ours:
            return super().forward(text_x, audio_x, video_x, *args, **kwargs)
        return self._forward_ours(text_x, audio_x, video_x, *args, **kwargs)

    def _forward_ours(self, text: Tensor, audio: Tensor, vision: Tensor, audio_lengths: Tensor | None = None,
                      vision_lengths: Tensor | None = None) -> dict[str, Tensor]:
        for name, frames, lengths in (("audio", audio, audio_lengths), ("vision", vision, vision_lengths)):
            if lengths is None:
                _refuse_unmarked_padding(name, frames, type(self.Model).__name__)
        return self.Model(text, audio, vision, audio_lengths, vision_lengths)


class ATIO(_MMSA_ATIO):
    """MMSA's trainer factory, extended with the registered models."""

    def getTrain(self, args: EasyDict):
        return EMTDLFRTrainer(args) if _is_ours(args) else super().getTrain(args)


class _Delegate:
    """Stands in for a module: selected attributes replaced, everything else read from the original."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        self.__dict__.update(_target=target, **overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _set_device_if_cuda(device: Any) -> None:
    """``torch.cuda.set_device`` for CUDA devices; a no-op for the CPU (MMSA calls it unconditionally)."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)


def _plain_round(number: Any, ndigits: int | None = None) -> Any:
    """``round`` that gives Python floats for numpy scalars, so MMSA's results CSV holds plain numbers."""
    value = builtins.round(number, ndigits)
    return float(value) if hasattr(value, "dtype") else value


def _set_logger_once(log_dir: Any, model_name: str, dataset_name: str, verbose_level: int) -> logging.Logger:
    """MMSA's logger setup, after removing the handlers an earlier MMSA_run left (no doubled lines). The log file
    ``<log_dir>/<model>-<dataset>.log`` is shared by every run of that pair and appended to, also by runs at the
    same time; its lines carry the process id so that concurrent runs can be told apart."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    result = _ORIGINAL_SET_LOGGER(log_dir, model_name, dataset_name, verbose_level)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s [%(levelname)s] [pid %(process)d] - "
                                                   "%(message)s"))
    return result


_ORIGINAL_SET_LOGGER = mmsa_run._set_logger
_ORIGINAL_RUN = mmsa_run._run
_ORIGINAL_MMSA_TEST = mmsa_run.MMSA_test
_noted = threading.local()  # the result names of the last MMSA _run in this thread


def _run_noting_result_keys(args: EasyDict, num_workers: int = 4, is_tune: bool = False,
                            from_sena: bool = False) -> Any:
    """MMSA's ``_run``; notes the names of the results it returns (MMSA_run's CSV columns, see ``_mmsa_read_csv``)."""
    result = _ORIGINAL_RUN(args, num_workers, is_tune, from_sena)
    if not from_sena:
        _noted.result_keys = list(result)
    return result


def _write_csv_atomically(frame: pd.DataFrame, csv_file: Path) -> None:
    """Writes ``frame`` to a unique temporary file beside ``csv_file``, then renames it over ``csv_file``."""
    mode = stat.S_IMODE(csv_file.stat().st_mode) if csv_file.is_file() else 0o644
    fd, temp = tempfile.mkstemp(dir=csv_file.parent, prefix=f".{csv_file.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            frame.to_csv(handle, index=False)
        os.chmod(temp, mode)
        os.replace(temp, csv_file)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def append_results(csv_file: str | os.PathLike, rows: pd.DataFrame) -> None:
    """Adds ``rows`` to the results CSV ``csv_file``, under the lock file ``<csv_file>.lock`` (runs finishing at
    the same time take turns): the rows already there are kept as written, the columns are the union of both (the
    file's first, then new ones; a row lacking a column gets an empty cell), and the file is replaced atomically.
    MMSA itself appends with the columns of the file's first writer and fails on a row with others (EMT-DLFR's
    'Loss(pred_m)')."""
    csv_file = Path(csv_file)
    new = rows.astype(object)
    with FileLock(f"{csv_file}.lock"):
        if csv_file.is_file():
            try:
                old = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
                raise ValueError(f"cannot add results to {csv_file}, which is not a readable CSV ({error}); it was "
                                 f"left unchanged. The new results:\n{new.to_string(index=False)}") from error
            new = pd.concat([old.astype(object), new], ignore_index=True, sort=False)
        _write_csv_atomically(new, csv_file)


class _ResultsRows:
    """Stands in for the DataFrame ``MMSA_run`` fills for its results CSV, ``<res_save_dir>/normal/<dataset>.csv``:
    it takes this run's row (``df.loc[len(df)] = row``) and ``to_csv`` adds it to the file with ``append_results``
    instead of MMSA's unlocked read-modify-write with the file's first columns."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns, self.rows = list(columns), []
        self.loc = self

    def __len__(self) -> int:
        return len(self.rows)

    def __setitem__(self, index: int, row: Sequence[Any]) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"a results row of {len(row)} values for the columns {self.columns}")
        self.rows.append(list(row))

    def to_csv(self, path: str | os.PathLike, index: Any = None) -> None:
        append_results(path, pd.DataFrame(self.rows, columns=self.columns, dtype=object))


def _mmsa_read_csv(path: Any, *args: Any, **kwargs: Any) -> Any:
    """``pd.read_csv`` for MMSA.run; MMSA_run's read of its results CSV (``.../normal/<dataset>.csv``, after its
    runs) gets a ``_ResultsRows`` with this run's columns instead, the file being read later, under the lock."""
    keys = getattr(_noted, "result_keys", None)
    if args or kwargs or keys is None or Path(path).parent.name != "normal":
        return pd.read_csv(path, *args, **kwargs)
    del _noted.result_keys
    return _ResultsRows(["Model", *keys])


def _mmsa_data_frame(*args: Any, **kwargs: Any) -> Any:
    """``pd.DataFrame`` for MMSA.run; MMSA_run's new results table (columns 'Model', metrics...) is a
    ``_ResultsRows``."""
    columns = kwargs.get("columns")
    if not args and list(kwargs) == ["columns"] and columns and columns[0] == "Model":
        return _ResultsRows(columns)
    return pd.DataFrame(*args, **kwargs)


def _test_args(config: Any) -> dict:
    """MMSA_test's config: a dict of args, or the path of a JSON file holding one."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"MMSA_test config file not found: {path}")
        args = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(args, dict) and "datasetCommonParams" in args:
            raise ValueError(f"{path} is an MMSA config file of several models; MMSA_test takes one run's args: "
                             "pass mmsa_emt.load_config(model, dataset, config_file)")
        return args
    if isinstance(config, dict):
        return config
    raise ValueError(f"'config' should be a path or a dict, not {type(config).__name__}")


def _read_test_sample(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One sample's features for MMSA_test (``text_bert`` (3, l), ``audio`` (t_a, f_a), ``vision`` (t_v, f_v),
    optional ``audio_lengths``/``vision_lengths``), with errors naming the file and key."""
    try:
        with open(path, "rb") as f:
            sample = pickle.load(f)
    except OSError:
        raise
    except Exception as error:  # pickle raises UnpicklingError, EOFError, ValueError, ... for what is no pickle
        raise ValueError(f"{path} is not a readable pickle of one sample's features ({type(error).__name__}: "
                         f"{error})") from error
    if not isinstance(sample, Mapping):
        raise ValueError(f"{path} holds a {type(sample).__name__}; MMSA_test wants a dict of one sample's features")
    out = {}
    for key, ndim in (("text_bert", 2), ("audio", 2), ("vision", 2)):
        if key not in sample:
            raise KeyError(f"{path} has no '{key}' (it has: {', '.join(map(str, sample))}); EMT-DLFR reads "
                           "text_bert (token ids, mask, segment ids: (3, l)), audio (t_a, f_a) and vision (t_v, f_v)")
        value = np.asarray(sample[key], dtype=np.float32)
        if value.ndim != ndim or 0 in value.shape:
            raise ValueError(f"{path}: '{key}' has shape {value.shape}; one sample's features without the batch "
                             "axis are wanted (text_bert (3, l), audio (t_a, f_a), vision (t_v, f_v))")
        out[key] = value
    if out["text_bert"].shape[0] != 3:
        raise ValueError(f"{path}: 'text_bert' has shape {out['text_bert'].shape}, not (3, l)")
    for name in ("audio", "vision"):
        out[f"{name}_lengths"] = _sample_length(sample, name, out[name], path)
    return out


def _sample_length(sample: Mapping[str, Any], name: str, frames: np.ndarray, path: Any) -> int:
    """The number of real frames of ``name``: ``<name>_lengths`` from the sample, else the full length, refusing
    trailing all-zero frames (padding in MMSA's feature files) rather than reading them as real."""
    key, total = f"{name}_lengths", frames.shape[0]
    if key not in sample:
        real = np.flatnonzero(np.any(frames != 0, axis=1))
        trailing = total - (int(real[-1]) + 1 if real.size else 0)
        if trailing:
            raise ValueError(f"{path}: the last {trailing} of the {total} frames of '{name}' are all zeros and the "
                             f"sample has no '{key}'; zero frames at the end are padding in MMSA's feature files and "
                             f"would be read as real frames. Add '{key}' (the number of real frames, e.g. from the "
                             f"split's '{key}'; {total} if the zero frames are real)")
        return total
    value = np.asarray(sample[key]).reshape(-1)
    if value.size != 1 or value.dtype.kind not in "iuf" or not float(value[0]).is_integer() \
            or not 0 <= value[0] <= total:
        raise ValueError(f"{path}: '{key}' must be one whole number of frames in [0, {total}] (the length of "
                         f"'{name}'), got {sample[key]!r}")
    return int(value[0])


def mmsa_test(config: Any, weights_path: str | os.PathLike, feature_path: str | os.PathLike,
              gpu_id: int = 0) -> Any:
    """``MMSA_test`` (one sample's prediction from saved weights). For mmsa-emt's models: a checkpoint that
    carries its config is rebuilt from it (``checkpoint``; ``config`` then only names the model), weight-only files
    are built from ``config`` and loaded strictly (``load_weights``), an unreadable weights or feature file is
    named, and audio/vision are read up to the sample's ``audio_lengths``/``vision_lengths`` (without them,
    trailing all-zero frames are refused). Other models go to MMSA's own ``MMSA_test``."""
    args = _test_args(config)
    if not _is_ours(args):
        return _ORIGINAL_MMSA_TEST(config, weights_path, feature_path, gpu_id)
    sample = _read_test_sample(feature_path)
    device = torch.device("cpu") if gpu_id < 0 else settings.checked_assign_gpu([gpu_id])  # absent: an error
    lengths = {name: max(sample[f"{name}_lengths"], 1) for name in ("audio", "vision")}  # the model reads >= 1
    inputs = {"text": sample["text_bert"], **{name: sample[name][:lengths[name]] for name in ("audio", "vision")}}
    args = EasyDict(dict(args))
    dims = list(args.get("feature_dims") or [768, 0, 0])
    args.update(train_mode="regression", device=device,
                feature_dims=[dims[0], inputs["audio"].shape[1], inputs["vision"].shape[1]],
                seq_lens=[inputs["text"].shape[1], inputs["audio"].shape[0], inputs["vision"].shape[0]])
    saved = checkpoint_format.load_file(weights_path, map_location="cpu")
    if checkpoint_format.is_packaged(saved):  # the network as the file's config says, not as the args say
        model = checkpoint_format.build(checkpoint_format.from_saved(saved, str(weights_path)))
        checkpoint_format.check_input_widths(model.config, inputs["audio"].shape[1], inputs["vision"].shape[1],
                                             f"{feature_path} (for {weights_path})")
    else:
        model = AMIO(args)
        load_weights(model, saved, source=str(weights_path))
    model.to(device).eval()
    batch = {k: torch.from_numpy(v)[None].to(device) for k, v in inputs.items()}
    with torch.no_grad():
        output = model(batch["text"], batch["audio"], batch["vision"], torch.tensor([lengths["audio"]]),
                       torch.tensor([lengths["vision"]]))["M"]
    return output.cpu().numpy()[0][0]


def register() -> None:
    """Hooks mmsa-emt's models into ``MMSA_run``/``MMSA_test``; safe to call any number of times."""
    mmsa_run.AMIO = AMIO
    mmsa_run.ATIO = ATIO
    mmsa_run.MMDataLoader = _settings_checked_loader
    mmsa_run.get_config_regression = _config_regression
    mmsa_run.get_config_tune = _config_tune
    mmsa_run.assign_gpu = settings.checked_assign_gpu  # a GPU asked for and absent is an error, not the CPU
    mmsa_run.torch = _Delegate(torch, cuda=_Delegate(torch.cuda, set_device=_set_device_if_cuda),
                               load=_load_checkpoint)
    mmsa_run.round = _plain_round
    mmsa_run._set_logger = _set_logger_once
    mmsa_run._run = _run_noting_result_keys
    mmsa_run.pd = _Delegate(pd, read_csv=_mmsa_read_csv, DataFrame=_mmsa_data_frame)
    mmsa_run.MMSA_test = MMSA.MMSA_test = mmsa_test  # MMSA/__init__ binds the function itself
    _mend_builtin_models()
    mmsa_data_loader.MMDataset = _MMDataset  # MMDataLoader reads this global at call time
    MetricsTop.getMetics = _get_metics
    for name in list_models():
        display = name.upper()
        if display not in mmsa_run.SUPPORTED_MODELS:
            mmsa_run.SUPPORTED_MODELS.append(display)
