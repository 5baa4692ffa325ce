"""MMSA's data path for our models and MMSA's: the feature file read once and checked before use (naming file,
split and key at fault), normalized on load when ``normalize_features`` asks, non-finite audio/vision zeroed for
our models, any dataset name loaded (``_MMDataset``), and MMSA's batches turned into ``TwoViewBatch``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import MMSA.data_loader as mmsa_data_loader
import torch
from easydict import EasyDict
from MMSA.data_loader import MMDataLoader as _mmsa_data_loader
from MMSA.data_loader import MMDataset
from torch.utils.data import DataLoader

from .. import settings
from ..data_check import FeatureReport, check_feature_file, load_feature_file, zero_nonfinite
from ..dlfr import TwoViewBatch
from ..missing import incomplete_view_file
from ..normalize import normalize_features, normalize_setting, normalized_file
from ..registry import canonical_name
from .config import check_args
from .config import is_ours as _is_ours
from .mends import _mend_builtin_args

logger = logging.getLogger("MMSA")
MMSA_UNK_ID = 100  # MMSA's data_missing writes this id for every dropped token
MMSA_DATASETS = ("mosi", "mosei", "sims")  # the names MMSA's MMDataset and MetricsTop know
DEFAULT_MISSING_SEEDS = tuple(settings.SETTINGS["missing_seed"].default)  # the authors' per-modality seeds
SIMS_LABEL_KEYS = ("regression_labels_T", "regression_labels_A", "regression_labels_V")


def _check_missing_settings(args: EasyDict) -> None:
    """EMT-DLFR needs MMSA's data_missing machinery: one rate in [0, 1] and one seed per modality (the table's
    checks, ``settings.SETTINGS``; a rate given once counts for all three modalities)."""
    args["data_missing"] = settings.get(args, "data_missing")
    args["missing_rate"] = settings.get(args, "missing_rate")
    args["missing_seed"] = settings.get(args, "missing_seed") or list(DEFAULT_MISSING_SEEDS)


def _check_vocabulary(args: EasyDict, max_token_id: int | None, feature_path: str) -> None:
    """A local encoder must share the ids the features were tokenized with, and MMSA's [UNK] id."""
    folder = Path(str(settings.get(args, "pretrained"))).expanduser()
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
                                config_hint=settings.get(args, "feature_hint"), data=data)
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
    return load_feature_file(_feature_path(args), config_hint=settings.get(args, "feature_hint"))


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


NATIVE_MISSING = ("tfr_net",)  # MMSA's own missing-aware model: it reads MMSA's incomplete view itself


def reads_incomplete_view(model_name: str) -> bool:
    """True for models that take MMSA's data_missing view natively (ours, TFR-Net); the others are fed a derived
    feature file holding only the incomplete view (see ``mmsa_emt.missing``)."""
    return canonical_name(model_name) is not None or model_name.lower() in NATIVE_MISSING


def at_missing_rates(args: EasyDict, rates: Sequence[float], cache_dir: Path) -> EasyDict:
    """A copy of ``args`` whose data is missing at ``rates`` (text, audio, vision): MMSA's ``data_missing`` for
    the models that read it, else a derived feature file written once into ``cache_dir``."""
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


def _settings_checked_loader(args: EasyDict, num_workers: int = 4) -> dict[str, DataLoader]:
    """``checked_data_loader`` after ``check_args``: MMSA's ``_run`` calls its loader first, once per seed (or
    tuning trial), with the args merged from the config file and ``config=``, before any data is read or any model
    built."""
    check_args(args)
    return checked_data_loader(args, num_workers)
