"""The only module that knows MMSA 2.2.1: its args bag, names, config layout, data loader, trainer interface.

``register()`` hooks EMT-DLFR into ``MMSA_run``/``MMSA_test`` from outside, without editing MMSA's files: MMSA
builds its model and trainer maps inside ``AMIO.__init__``/``ATIO.__init__`` and looks ``AMIO``, ``ATIO``,
``MMDataLoader`` and the config readers up as globals of ``MMSA.run`` at call time, so replacing those globals with
subclasses/wrappers that know our models is enough. The same globals carry the mends MMSA 2.2.1 needs today:
no ``torch.cuda.set_device`` on a CPU device, plain numbers (not ``np.float64(...)`` text) in the results CSV under
numpy 2, config paths relative to the config file, feature files checked before use, per-seed checkpoints that
never overwrite earlier ones, one set of log handlers however often ``MMSA_run`` is called, datasets beyond MMSA's
three (``mmsa_emt.metrics``), and MMSA's own baselines made to run offline with a local encoder of any width.
It also runs one train-and-test trial at given missing rates for ``mmsa_emt.robustness``.
"""

from __future__ import annotations

import builtins
import copy
import functools
import importlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import MMSA
import MMSA.data_loader as mmsa_data_loader
import MMSA.run as mmsa_run
import torch
from easydict import EasyDict
from MMSA.config import get_config_regression as _mmsa_config_regression
from MMSA.config import get_config_tune as _mmsa_config_tune
from MMSA.data_loader import MMDataLoader as _mmsa_data_loader
from MMSA.data_loader import MMDataset
from MMSA.models.AMIO import AMIO as _MMSA_AMIO
from MMSA.models.missingTask.TFR_NET.model import TFR_NET as MMSA_TFR_NET
from MMSA.models.singleTask.MISA import MISA as MMSA_MISA
from MMSA.trains.ATIO import ATIO as _MMSA_ATIO
from MMSA.utils import MetricsTop, assign_gpu, dict_to_str, setup_seed
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader

from . import dlfr as _dlfr  # noqa: F401  (registers the models)
from . import fast
from .data_check import FeatureReport, check_feature_file, load_feature_file, zero_nonfinite
from .fast import SpeedConfig
from .metrics import DATASET_METRICS
from .missing import incomplete_view_file
from .model import MODALITIES, EMTDLFRConfig
from .objective import LossWeights, TwoViewBatch
from .registry import canonical_name, get_builder, list_models
from .trainer import OptimConfig, build_optimizer, evaluate, fit

logger = logging.getLogger("MMSA")
MMSA_UNK_ID = 100  # MMSA's data_missing writes this id for every dropped token
MINIMIZED_KEYS = ("Loss", "Loss(pred_m)", "MAE", "RMSE")
MMSA_DATASETS = ("mosi", "mosei", "sims")  # the names MMSA's MMDataset and MetricsTop know
DEFAULT_MISSING_SEEDS = (111, 1111, 11111)  # the authors' per-modality missing seeds
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


def _config_regression(model_name: str, dataset_name: str, config_file: str = "") -> EasyDict:
    return load_config(model_name, dataset_name, config_file)


def _config_tune(model_name: str, dataset_name: str, config_file: str = "", random_choice: bool = True) -> EasyDict:
    return load_config(model_name, dataset_name, config_file, tune=True)


def _require(args: Mapping[str, Any], key: str) -> Any:
    if key not in args:
        raise KeyError(f"config key '{key}' is missing for model '{args.get('model_name')}' "
                       f"(config file {args.get('config_file', '?')})")
    return args[key]


def _is_ours(args: Mapping[str, Any]) -> bool:
    return canonical_name(str(args.get("model_name", ""))) is not None


def model_config_from_args(args: Mapping[str, Any]) -> EMTDLFRConfig:
    """MMSA args (the authors' key names) -> explicit network config."""
    r = lambda key: _require(args, key)  # noqa: E731
    feature_dims = r("feature_dims")
    return EMTDLFRConfig(
        pretrained=str(r("pretrained")), audio_dim=int(feature_dims[1]), vision_dim=int(feature_dims[2]),
        finetune_bert=bool(args.get("use_finetune", True)),
        audio_hidden=r("a_lstm_hidden_size"), vision_hidden=r("v_lstm_hidden_size"),
        audio_lstm_layers=args.get("a_lstm_layers", 1), vision_lstm_layers=args.get("v_lstm_layers", 1),
        audio_lstm_dropout=args.get("a_lstm_dropout", 0.0), vision_lstm_dropout=args.get("v_lstm_dropout", 0.0),
        audio_out=r("audio_out"), vision_out=r("video_out"), d_model=r("d_model"), fusion_layers=r("fusion_layers"),
        heads=r("heads"), ff_expansion=args.get("ff_expansion", 4), emb_dropout=args.get("emb_dropout", 0.0),
        attn_dropout=r("attn_dropout"), ff_dropout=r("ff_dropout"),
        learnable_pos_emb=bool(args.get("learnable_pos_emb", False)), max_seq_len=args.get("max_seq_len", 1024),
        mpu_share=bool(r("mpu_share")), modality_share=bool(r("modality_share")), layer_share=bool(r("layer_share")),
        pool_activation=args.get("attn_act_fn", "tanh"), post_fusion_dim=r("post_fusion_dim"),
        post_fusion_dropout=r("post_fusion_dropout"),
        predictor_dims={"context": r("gmc_tokens_pred_dim"), "text": r("text_pred_dim"),
                        "audio": r("audio_pred_dim"), "vision": r("video_pred_dim")},
        modalities=tuple(args.get("modalities") or MODALITIES),
    )


def optim_config_from_args(args: Mapping[str, Any]) -> OptimConfig:
    r = lambda key: float(_require(args, key))  # noqa: E731
    return OptimConfig(lr_bert=r("learning_rate_bert"), lr_audio=r("learning_rate_audio"),
                       lr_vision=r("learning_rate_video"), lr_other=r("learning_rate_other"),
                       wd_bert=r("weight_decay_bert"), wd_audio=r("weight_decay_audio"),
                       wd_vision=r("weight_decay_video"), wd_other=r("weight_decay_other"))


def speed_config_from_args(args: Mapping[str, Any]) -> SpeedConfig:
    """How to compute (``mmsa_emt.fast``): ``speed`` ('fast' | 'faithful') names the preset and the lever keys
    present (``fast.LEVERS``: fused_attention, precision, ...) override it; 'auto' values follow ``device``."""
    return fast.from_settings(args, args.get("device", "cpu"))


def loss_weights_from_args(args: Mapping[str, Any]) -> LossWeights:
    return LossWeights(attraction=float(args.get("loss_attra_weight", 1.0)),
                       reconstruction=float(args.get("loss_recon_weight", 1.0)),
                       recon_kind=str(args.get("recon_loss", "SmoothL1Loss")))


# ----------------------------------------------------------------------------------------------- data
def _check_missing_settings(args: EasyDict) -> None:
    """EMT-DLFR needs MMSA's data_missing machinery: one rate in [0, 1] and one seed per modality."""
    args["data_missing"] = True
    rates = args.get("missing_rate")
    if rates is None:
        raise KeyError(f"config key 'missing_rate' (three rates for text, audio, vision) is missing for "
                       f"'{args['model_name']}' (config file {args.get('config_file', '?')})")
    if isinstance(rates, (int, float)):
        rates = [float(rates)] * 3
    if len(rates) != 3 or not all(0.0 <= float(r) <= 1.0 for r in rates):
        raise ValueError(f"missing_rate must be three numbers in [0, 1] (text, audio, vision), got {rates}")
    args["missing_rate"] = [float(r) for r in rates]
    seeds = args.get("missing_seed") or list(DEFAULT_MISSING_SEEDS)
    if len(seeds) != 3:
        raise ValueError(f"missing_seed must be three integers (text, audio, vision), got {seeds}")
    args["missing_seed"] = [int(s) for s in seeds]


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


@contextmanager
def _checked_features(args: EasyDict, data: Any = None) -> Iterator[FeatureReport]:
    """Reads the feature file once (unless its content ``data`` is given) and checks it (see ``_check_inputs``);
    yields the report, and MMSA's datasets built within the block get that content instead of unpickling the file
    again (``_unpickled_once``)."""
    path = _feature_path(args)
    data = _read_features(args) if data is None else data
    report = _check_inputs(args, data)
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


def checked_test_loader(args: EasyDict, num_workers: int = 0, *, data: Any = None) -> DataLoader:
    """The test split alone, checked and mended like ``checked_data_loader`` (the file read once, or not at all
    when its content ``data`` is given)."""
    with _checked_features(args, data) as report:
        dataset = _MMDataset(args, mode="test")
    _mend_datasets(args, report, [dataset])
    return DataLoader(dataset, batch_size=args["batch_size"], shuffle=False, num_workers=num_workers)


def checked_test_loaders(args_list: Iterable[EasyDict], num_workers: int = 0) -> Iterator[DataLoader]:
    """``checked_test_loader`` for each of ``args_list``, built one at a time as they are asked for. Consecutive
    args naming the same feature file (a model tested at several missing rates) share one read of it, held until
    the next file or the end; each loader is still checked and built from its own args."""
    path, data = None, None
    for args in args_list:
        if (file := _feature_path(args)) != path:
            data = None  # the previous file's content released before the next one is read
            path, data = file, _read_features(args)
        yield checked_test_loader(args, num_workers, data=data)


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
    """Per-seed checkpoint next to MMSA's path; an existing file is never overwritten (a counter is added)."""
    if "model_save_base" not in args:
        args["model_save_base"] = str(args["model_save_path"])
    base, tag = Path(args["model_save_base"]), f"-seed{torch.initial_seed()}"
    stem = base.stem if base.stem.endswith(tag) else base.stem + tag
    path, n = base.with_name(stem + base.suffix), 1
    while path.exists():
        path, n = base.with_name(f"{stem}-{n}{base.suffix}"), n + 1
    return path


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

        self.speed.prepare_model(net)
        result = fit(net, _Batches(dataloader["train"]), _Batches(dataloader["valid"]),
                     optimizer=build_optimizer(net, optim_config_from_args(args)), weights=self.weights,
                     metric_fn=self.metrics, key_metric=self.key_metric, minimize=self.key_metric in MINIMIZED_KEYS,
                     early_stop=int(args.get("early_stop", 8)), max_epochs=args.get("max_epochs"),
                     update_every=int(args.get("update_epochs", 1)), save_path=save_path, checkpoint_prefix="Model.",
                     device=self.device, progress=self.progress, logger=logger, on_epoch_end=on_epoch_end,
                     speed=self.speed)
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
        at["featurePath"] = str(incomplete_view_file(args["featurePath"], rates, seeds, cache_dir))
        at["data_missing"] = False
    return at


def trial_args(model_name: str, dataset_name: str, config_file: str | os.PathLike, *,
               overrides: Mapping[str, Any] | None = None, gpu_ids: Sequence[int] = ()) -> EasyDict:
    """The args ``MMSA_run`` would build for one run, plus ``overrides``."""
    args = load_config(model_name, dataset_name, config_file)
    args.update(dict(overrides or {}))
    args.update(device=assign_gpu(list(gpu_ids)), train_mode="regression", custom_feature=None, feature_T=None,
                feature_A=None, feature_V=None, cur_seed=1)
    return args


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
class AMIO(_MMSA_AMIO):
    """MMSA's model wrapper, extended with the registered models (state-dict keys stay 'Model.*')."""

    def __init__(self, args: EasyDict) -> None:
        if not _is_ours(args):
            super().__init__(args)
            return
        nn.Module.__init__(self)
        self.need_model_aligned = False
        config = model_config_from_args(args)
        self.Model = fast.apply(get_builder(args["model_name"])(config), speed_config_from_args(args),
                                args.get("device", "cpu"))
        text_out = args.get("text_out")
        width = self.Model.utterance_dims.get("text")
        if text_out is not None and width is not None and int(text_out) != width:
            logger.info(f"text_out={text_out} in the config; the text width follows the loaded encoder: "
                        f"{width}")


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
    """MMSA's logger setup, after removing the handlers an earlier MMSA_run left (no doubled lines)."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    return _ORIGINAL_SET_LOGGER(log_dir, model_name, dataset_name, verbose_level)


_ORIGINAL_SET_LOGGER = mmsa_run._set_logger


def register() -> None:
    """Hooks mmsa-emt's models into ``MMSA_run``/``MMSA_test``; safe to call any number of times."""
    mmsa_run.AMIO = AMIO
    mmsa_run.ATIO = ATIO
    mmsa_run.MMDataLoader = checked_data_loader
    mmsa_run.get_config_regression = _config_regression
    mmsa_run.get_config_tune = _config_tune
    mmsa_run.torch = _Delegate(torch, cuda=_Delegate(torch.cuda, set_device=_set_device_if_cuda))
    mmsa_run.round = _plain_round
    mmsa_run._set_logger = _set_logger_once
    _mend_builtin_models()
    mmsa_data_loader.MMDataset = _MMDataset  # MMDataLoader reads this global at call time
    MetricsTop.getMetics = _get_metics
    for name in list_models():
        display = name.upper()
        if display not in mmsa_run.SUPPORTED_MODELS:
            mmsa_run.SUPPORTED_MODELS.append(display)
