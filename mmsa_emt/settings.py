"""Every setting EMT-DLFR reads from MMSA's args, in one table: type, default, allowed range, meaning; and the check
of MMSA's args that runs before any data is read or any model is built. A setting that fills a field of a config
dataclass (``EMTDLFRConfig``, ``OptimConfig``, ``LossWeights``, ``SpeedConfig``, ``TrainingConfig``; the mapping
is ``mmsa_emt.mmsa.config.ARGS_FIELDS``) takes its default from that field, so each default is written once.

MMSA hands every model one flat dict of settings (its "args"), merged from the config file's
``datasetCommonParams``, the model's ``commonParams`` and ``datasetParams`` entries, ``MMSA_run``'s ``config=``
overrides and values ``MMSA_run`` sets itself. ``check_args`` validates that dict for EMT-DLFR: an unknown key is
an error that suggests the closest known one, every value is type- and range-checked (the message names key and
value), and numeric strings ("8", "1e-3") are converted. For MMSA's own models only the keys every trainer shares
are checked (``SHARED_KEYS``), so their model-specific keys pass. ``docs/configuration.md`` holds the table as
``markdown_table`` writes it.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from MMSA.utils import MetricsTop
from MMSA.utils import assign_gpu as _mmsa_assign_gpu

from .dlfr import RECON_LOSSES
from .fast.config import PRECISIONS, PRESETS, REMOVED, SpeedConfig
from .metrics import DATASET_METRICS
from .mmsa.run_config import EMTDLFRConfig, LossWeights, TrainingConfig
from .nn.emt import POOL_ACTIVATIONS

MODALITY_NAMES = ("text", "audio", "vision")  # the order of missing_rate, missing_seed, feature_dims and seq_lens
LOSS_KEYS = ("Loss", "Loss(pred_m)")  # validation results of EMT-DLFR's trainer besides the dataset's metrics


class SettingError(ValueError):
    """A setting with a wrong type or a value out of its range, or an unknown key."""


class _Required:
    """The default of a setting that has none: the config must give it."""

    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


def _where(args: Mapping[str, Any]) -> str:
    file = args.get("config_file")
    return f"config file {file}" if file else "the settings given"


def _show(value: Any) -> str:
    """A value as a user writes it in a JSON config (true/false/null, strings double-quoted)."""
    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    except (TypeError, ValueError):
        return repr(value)


# ----------------------------------------------------------------------------------------------- value kinds
class _Invalid(Exception):
    """Raised by a kind's ``convert``; ``Setting.check`` turns it into a SettingError naming key and value."""


def _number(value: Any, what: str) -> float:
    """A number or a numeric string ("1e-3", "0.5") as a finite float; bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise _Invalid(f"must be {what}")
    try:
        number = float(value)
    except ValueError:
        raise _Invalid(f"must be {what}") from None
    if not math.isfinite(number):
        raise _Invalid(f"must be {what} (finite)")
    return number


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


@dataclass(frozen=True)
class Bool:
    """JSON true/false only: "false", "no" or 0 are refused (a non-empty string would read as true)."""

    type_text = "bool"
    range_text = "true, false"

    def convert(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Invalid("must be true or false (JSON booleans, not strings or numbers)")
        return value


@dataclass(frozen=True)
class Int:
    """An integer; integral numbers and numeric strings ("8", "8.0") are converted."""

    low: int | None = None
    high: int | None = None
    type_text = "int"

    @property
    def range_text(self) -> str:
        return _bounds(self.low, self.high, False, False) or "any"

    def convert(self, value: Any) -> int:
        what = "an integer" + (f" {self.range_text}" if self.range_text != "any" else "")
        number = _number(value, what)
        if number != int(number):
            raise _Invalid(f"must be {what}")
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise _Invalid(f"must be {what}")
        return int(number)


@dataclass(frozen=True)
class Float:
    """A finite number; numeric strings ("1e-3") are converted."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    type_text = "float"

    @property
    def range_text(self) -> str:
        return _bounds(self.low, self.high, self.low_open, self.high_open) or "any"

    def convert(self, value: Any) -> float:
        what = "a number" + (f" {self.range_text}" if self.range_text != "any" else "")
        number = _number(value, what)
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if too_low or too_high:
            raise _Invalid(f"must be {what}")
        return number


@dataclass(frozen=True)
class Choice:
    """One of fixed values (strings and/or JSON literals such as false)."""

    options: tuple[Any, ...]
    type_text = "choice"

    @property
    def range_text(self) -> str:
        return ", ".join(_show(o) for o in self.options)

    def convert(self, value: Any) -> Any:
        for option in self.options:  # bools compared by identity: 0/1 are not false/true
            if (value is option) if isinstance(option, bool) else (not isinstance(value, bool) and value == option):
                return option
        raise _Invalid(f"must be one of {self.range_text}")


@dataclass(frozen=True)
class Text:
    """A non-empty string (``range_text``: what else it must be, checked elsewhere)."""

    range_text: str = "non-empty"
    type_text = "str"

    def convert(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise _Invalid("must be a non-empty string")
        return value


@dataclass(frozen=True)
class PathLike:
    """A file or folder path (str or os.PathLike)."""

    type_text = "path"
    range_text = "any"

    def convert(self, value: Any) -> Any:
        if not isinstance(value, (str, os.PathLike)):
            raise _Invalid("must be a path (a string)")
        return value


@dataclass(frozen=True)
class Ints:
    """``n`` integers, one per modality (text, audio, vision)."""

    n: int = 3
    low: int | None = None
    type_text = "list of 3 int"

    @property
    def range_text(self) -> str:
        return "one per modality (text, audio, vision)" + (f", each >= {self.low}" if self.low is not None else "")

    def convert(self, value: Any) -> list[int]:
        what = f"a list of {self.n} integers (text, audio, vision)" + (
            f", each >= {self.low}" if self.low is not None else "")
        if not isinstance(value, (list, tuple)) or len(value) != self.n:
            raise _Invalid(f"must be {what}")
        element = Int(low=self.low)
        try:
            return [element.convert(v) for v in value]
        except _Invalid:
            raise _Invalid(f"must be {what}") from None


@dataclass(frozen=True)
class Rates:
    """Missing rates: one number in [0, 1] for all three modalities, or three (text, audio, vision)."""

    type_text = "float or list of 3 float"
    range_text = "each in [0, 1]"

    def convert(self, value: Any) -> list[float]:
        # the wording of MMSA-era messages, kept so that searches for it still find the cause
        what = "missing_rate must be three numbers in [0, 1] (text, audio, vision) or one number for all three"
        values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
        if len(values) != 3:
            raise _Invalid(what)
        element = Float(0.0, 1.0)
        try:
            return [element.convert(v) for v in values]
        except _Invalid:
            raise _Invalid(what) from None


@dataclass(frozen=True)
class Modalities:
    """A non-empty list of distinct modality names."""

    type_text = "list of str"
    range_text = "non-empty, distinct, from text, audio, vision"

    def convert(self, value: Any) -> list[str]:
        what = f"must be a non-empty list of distinct names from {', '.join(MODALITY_NAMES)}"
        if not isinstance(value, (list, tuple)) or not value:
            raise _Invalid(what)
        if any(not isinstance(v, str) or v not in MODALITY_NAMES for v in value) or len(set(value)) != len(value):
            raise _Invalid(what)
        return list(value)


@dataclass(frozen=True)
class Anything:
    """A value set by MMSA or the runner itself (a device, a list of key names): not checked."""

    type_text: str = "any"
    range_text = "set by the program"

    def convert(self, value: Any) -> Any:
        return value


Kind = Bool | Int | Float | Choice | Text | PathLike | Ints | Rates | Modalities | Anything


@dataclass(frozen=True)
class Setting:
    """One key of MMSA's args as EMT-DLFR reads it."""

    name: str
    kind: Kind
    default: Any
    doc: str
    group: str
    nullable: bool = False  # null (None) is allowed and means what ``doc`` says

    def check(self, value: Any, args: Mapping[str, Any] | None = None) -> Any:
        """``value`` converted to the setting's type; SettingError naming key, value and config file if it does
        not fit."""
        if value is None and self.nullable:
            return None
        try:
            return self.kind.convert(value)
        except _Invalid as problem:
            raise SettingError(f"config key '{self.name}' is {value!r} ({_where(args or {})}): "
                               f"{problem}") from None

    @property
    def default_text(self) -> str:
        if self.default is REQUIRED:
            return "required"
        return _show(self.default)


# ----------------------------------------------------------------------------------------------- the table
def _defaults(config: type) -> dict[str, Any]:
    """The field defaults of a config dataclass, by field name: the table takes each default from the field that
    owns it, so that it is written once (a field without a default is absent)."""
    return {f.name: f.default for f in fields(config) if f.default is not MISSING}


_SPEED_DEFAULTS = _defaults(SpeedConfig)
_NET, _LOSS_DEFAULTS, _TRAIN_DEFAULTS = _defaults(EMTDLFRConfig), _defaults(LossWeights), _defaults(TrainingConfig)
_MODEL, _OPTIM, _LOSS, _TRAIN, _MISSING, _SPEED = ("model", "optimizer", "loss", "training", "missing data",
                                                    "speed and memory")
_DATA, _RUN = "data (datasetCommonParams, MMSA's keys)", "set by MMSA_run and the runners (not for the config file)"
_DROPOUT = Float(0.0, 1.0, high_open=True)
_POSITIVE = Int(low=1)


def _table(*settings: Setting) -> dict[str, Setting]:
    table = {s.name: s for s in settings}
    if len(table) != len(settings):
        raise ValueError("a key is listed twice in the settings table")
    return table


SETTINGS: dict[str, Setting] = _table(
    # --- model (EMTDLFRConfig)
    Setting("pretrained", Text(), REQUIRED, "text encoder: a Hugging Face hub name or a local BERT folder", _MODEL),
    Setting("use_finetune", Bool(), _NET["finetune_bert"], "fine-tune the text encoder (false: frozen)", _MODEL),
    Setting("a_lstm_hidden_size", _POSITIVE, REQUIRED, "hidden width of the audio LSTM", _MODEL),
    Setting("v_lstm_hidden_size", _POSITIVE, REQUIRED, "hidden width of the vision LSTM", _MODEL),
    Setting("a_lstm_layers", _POSITIVE, _NET["audio_lstm_layers"], "layers of the audio LSTM", _MODEL),
    Setting("v_lstm_layers", _POSITIVE, _NET["vision_lstm_layers"], "layers of the vision LSTM", _MODEL),
    Setting("a_lstm_dropout", _DROPOUT, _NET["audio_lstm_dropout"], "dropout between audio LSTM layers",
            _MODEL),
    Setting("v_lstm_dropout", _DROPOUT, _NET["vision_lstm_dropout"], "dropout between vision LSTM layers",
            _MODEL),
    Setting("audio_out", _POSITIVE, REQUIRED, "width of the audio utterance vector h_a", _MODEL),
    Setting("video_out", _POSITIVE, REQUIRED, "width of the vision utterance vector h_v", _MODEL),
    Setting("text_out", _POSITIVE, 768, "width of h_l in MMSA's configs; EMT-DLFR takes the loaded encoder's "
            "width instead (a different value is logged)", _MODEL),
    Setting("d_model", _POSITIVE, REQUIRED, "width of the EMT fusion (Eq. 4); must be divisible by heads", _MODEL),
    Setting("fusion_layers", _POSITIVE, REQUIRED, "EMT layers", _MODEL),
    Setting("heads", _POSITIVE, REQUIRED, "attention heads of the EMT", _MODEL),
    Setting("ff_expansion", _POSITIVE, _NET["ff_expansion"], "feed-forward width of the EMT as a multiple of "
            "d_model", _MODEL),
    Setting("emb_dropout", _DROPOUT, _NET["emb_dropout"], "dropout after the positional embedding", _MODEL),
    Setting("attn_dropout", _DROPOUT, REQUIRED, "dropout of the attention weights", _MODEL),
    Setting("ff_dropout", _DROPOUT, REQUIRED, "dropout in the EMT's feed-forward blocks", _MODEL),
    Setting("learnable_pos_emb", Bool(), _NET["learnable_pos_emb"], "learned positional embedding (false: "
            "sinusoidal)", _MODEL),
    Setting("max_seq_len", _POSITIVE, _NET["max_seq_len"], "longest sequence the positional embedding covers", _MODEL),
    Setting("mpu_share", Bool(), REQUIRED, "one set of weights for both directions of a mutual promotion unit "
            "(local <- global, global <- local)", _MODEL),
    Setting("modality_share", Bool(), REQUIRED, "one promotion unit for all modalities", _MODEL),
    Setting("layer_share", Bool(), REQUIRED, "one promotion unit for all EMT layers", _MODEL),
    Setting("attn_act_fn", Choice(tuple(POOL_ACTIVATIONS)), _NET["pool_activation"], "activation of the attention "
            "pooling", _MODEL),
    Setting("post_fusion_dim", _POSITIVE, REQUIRED, "width of the prediction head (Eq. 10)", _MODEL),
    Setting("post_fusion_dropout", _DROPOUT, REQUIRED, "dropout before the prediction head", _MODEL),
    Setting("gmc_tokens_pred_dim", _POSITIVE, REQUIRED, "hidden width of the global-context predictor (DLFR, "
            "utterance level)", _MODEL),
    Setting("text_pred_dim", _POSITIVE, REQUIRED, "hidden width of the text utterance predictor", _MODEL),
    Setting("audio_pred_dim", _POSITIVE, REQUIRED, "hidden width of the audio utterance predictor", _MODEL),
    Setting("video_pred_dim", _POSITIVE, REQUIRED, "hidden width of the vision utterance predictor", _MODEL),
    Setting("modalities", Modalities(), list(_NET["modalities"]), "modalities the model uses (the others are "
            "ignored)", _MODEL),
    # --- optimizer (OptimConfig)
    *(Setting(f"learning_rate_{part}", Float(0.0, low_open=True), REQUIRED, f"Adam learning rate of {what}",
              _OPTIM) for part, what in (("bert", "the text encoder"), ("audio", "the audio LSTM"),
                                         ("video", "the vision LSTM"), ("other", "everything else"))),
    *(Setting(f"weight_decay_{part}", Float(0.0), REQUIRED, f"weight decay of {what}", _OPTIM)
      for part, what in (("bert", "the text encoder (not its biases and LayerNorms)"), ("audio", "the audio LSTM"),
                         ("video", "the vision LSTM"), ("other", "everything else"))),
    # --- loss (LossWeights)
    Setting("loss_attra_weight", Float(0.0), _LOSS_DEFAULTS["attraction"], "weight of the attraction loss "
            "(Eq. 13)", _LOSS),
    Setting("loss_recon_weight", Float(0.0), _LOSS_DEFAULTS["reconstruction"], "weight of the reconstruction "
            "loss (Eq. 11)", _LOSS),
    Setting("recon_loss", Choice(tuple(RECON_LOSSES)), _LOSS_DEFAULTS["recon_kind"], "loss of the low-level "
            "reconstruction", _LOSS),
    # --- training
    Setting("batch_size", _POSITIVE, REQUIRED, "samples per batch", _TRAIN),
    Setting("KeyEval", Text("a validation result of the dataset, see meaning"),
            _TRAIN_DEFAULTS["key_eval"], "validation result "
            "that picks the best epoch: one of the dataset's metrics (MOSI/MOSEI: Has0_acc_2, Has0_F1_score, "
            "Non0_acc_2, Non0_F1_score, Mult_acc_5, Mult_acc_7, MAE, Corr; SIMS: Mult_acc_2, Mult_acc_3, "
            "Mult_acc_5, F1_score, MAE, Corr; AVEC2019: CCC, MAE, RMSE, "
            "Pearson) or Loss, Loss(pred_m); Loss, Loss(pred_m), MAE and RMSE are minimised, the others maximised",
            _TRAIN),
    Setting("early_stop", _POSITIVE, _TRAIN_DEFAULTS["early_stop"], "epochs without improvement of KeyEval before "
            "training stops", _TRAIN),
    Setting("max_epochs", _POSITIVE, _TRAIN_DEFAULTS["max_epochs"], "most epochs (null: until early_stop)", _TRAIN,
            nullable=True),
    Setting("update_epochs", _POSITIVE, _TRAIN_DEFAULTS["update_epochs"], "batches whose gradients are accumulated "
            "per optimizer step", _TRAIN),
    Setting("authors_training", Bool(), _TRAIN_DEFAULTS["authors_training"], "reproduce the authors' training "
            "semantics: float32 and the last partial accumulation group of an epoch dropped", _TRAIN),
    Setting("verbose_level", Int(0, 2), _TRAIN_DEFAULTS["verbose_level"], "0: errors only, 1: progress and "
            "results, 2: debug", _TRAIN),
    # --- missing data
    Setting("data_missing", Choice((True,)), True, "MMSA's incomplete view; EMT-DLFR always needs it (set "
            "missing_rate to 0 for none)", _MISSING),
    Setting("missing_rate", Rates(), REQUIRED, "share of dropped steps per modality in training and test "
            "(text, audio, vision)", _MISSING),
    Setting("missing_seed", Ints(3, low=0), [111, 1111, 11111], "seeds of the dropped steps per modality (null: the "
            "default)", _MISSING, nullable=True),
    Setting("normalize_features", Bool(), False, "standardise audio and vision features with the training "
            "split's statistics (true in the SIMS entry)", _MISSING),
    # --- speed and memory (mmsa_emt.fast: the same model, other ways to compute it). Defaults: SpeedConfig's,
    # the values of a config without these keys; ``speed`` picks a preset, and the keys present override it.
    Setting("speed", Choice(tuple(PRESETS)), None, "preset of the keys below: fast (the shipped entry) or "
            "faithful (the authors' way of computing); null: SpeedConfig's defaults", _SPEED, nullable=True),
    Setting("precision", Choice((*PRECISIONS, "auto")), _SPEED_DEFAULTS["precision"], "autocast of the forward "
            "pass; auto: bf16 where the device multiplies it natively, else fp32", _SPEED),
    Setting("trim_padding", Bool(), _SPEED_DEFAULTS["trim_padding"], "cut each batch to its longest sequences",
            _SPEED),
    Setting("trim_multiple", Int(low=1), _SPEED_DEFAULTS["trim_multiple"], "trimmed lengths rounded up to a "
            "multiple of it (null: 8 on CUDA, else 1)", _SPEED, nullable=True),
    Setting("pinned_transfer", Bool(), _SPEED_DEFAULTS["pinned_transfer"], "host-to-device copies through pinned "
            "memory, without blocking the host", _SPEED),
    Setting("compile", Bool(), _SPEED_DEFAULTS["compile"], "torch.compile the text encoder and the fusion", _SPEED),
    Setting("sync_every_step", Bool(), _SPEED_DEFAULTS["sync_every_step"], "read the loss back to the host every "
            "step, as the authors' loop does", _SPEED),
    Setting("fused_attention", Bool(), _SPEED_DEFAULTS["fused_attention"], "PyTorch's scaled-dot-product kernel "
            "(false: explicit score matrices)", _SPEED),
    Setting("fused_views", Bool(), _SPEED_DEFAULTS["fused_views"], "complete and incomplete view in one pass "
            "(false: two passes)", _SPEED),
    Setting("stack_modalities", Choice((False, "time", "auto")), _SPEED_DEFAULTS["stack_modalities"], "one "
            "fusion call for all modalities (with modality_share), joined along time; auto: time on CUDA, off on "
            "a CPU", _SPEED, nullable=True),
    Setting("packed_lstm", Bool(), _SPEED_DEFAULTS["packed_lstm"], "LSTMs over packed sequences, as the authors",
            _SPEED),
    Setting("checkpoint_encoder", Bool(), _SPEED_DEFAULTS["checkpoint_encoder"], "recompute the text encoder's "
            "activations in backward", _SPEED),
    Setting("checkpoint_fusion", Choice((True, False, "auto")), _SPEED_DEFAULTS["checkpoint_fusion"], "recompute "
            "the EMT's feed-forward blocks in backward; auto: true", _SPEED),
    Setting("encoder_fused_qkv", Bool(), _SPEED_DEFAULTS["encoder_fused_qkv"], "one query/key/value matmul in the "
            "encoder's layers", _SPEED),
    Setting("numpy_dropout", Bool(), _SPEED_DEFAULTS["numpy_dropout"], "CPU dropout masks from numpy's generator "
            "(false: torch's)", _SPEED),
    *(Setting(key, Bool(), shipped, f"removed: accepted only as {_show(shipped)}, with a warning ({why})", _SPEED)
      for key, (shipped, why) in REMOVED.items()),
    # --- data: MMSA's keys (datasetCommonParams and commonParams of every model)
    Setting("model_name", Text(), REQUIRED, "the model (set from MMSA_run's model_name)", _DATA),
    Setting("dataset_name", Text(), REQUIRED, "the dataset (set from MMSA_run's dataset_name)", _DATA),
    Setting("featurePath", PathLike(), REQUIRED, "feature file, relative to dataset_root_dir", _DATA),
    Setting("feature_dims", Ints(3, low=1), REQUIRED, "feature widths (text, audio, vision); MMSA's loader "
            "overwrites them with the file's", _DATA),
    Setting("seq_lens", Ints(3, low=1), REQUIRED, "sequence lengths (text, audio, vision); MMSA's loader "
            "overwrites them with the file's", _DATA),
    Setting("train_samples", Int(low=0), None, "training samples (read by some MMSA models)", _DATA,
            nullable=True),
    Setting("num_classes", Int(low=1), None, "classes of MMSA's classification mode (unused here)", _DATA,
            nullable=True),
    Setting("language", Text(), None, "en or cn (read by MMSA's GloVe-based models)", _DATA, nullable=True),
    Setting("need_data_aligned", Bool(), False, "read the word-aligned feature file", _DATA),
    Setting("need_model_aligned", Bool(), False, "align sequences inside MMSA's model wrapper", _DATA),
    Setting("need_normalized", Bool(), False, "MMSA's averaging of audio/vision over time (for MMSA's models "
            "that want it; false for EMT-DLFR)", _DATA),
    Setting("use_bert", Bool(), True, "text as BERT token ids (text_bert); EMT-DLFR needs it when it uses "
            "text", _DATA),
    Setting("transformers", Text(), "bert", "encoder family of MMSA's BERT-based models", _DATA),
    Setting("custom_feature", PathLike(), None, "MMSA_run's custom_feature: a feature file replacing "
            "featurePath", _RUN, nullable=True),
    *(Setting(f"feature_{m}", PathLike(), None, f"MMSA_run's feature_{m}", _RUN, nullable=True) for m in "TAV"),
    Setting("device", Anything("torch.device"), None, "set from MMSA_run's gpu_ids", _RUN, nullable=True),
    Setting("train_mode", Choice(("regression",)), "regression", "set by MMSA_run", _RUN),
    Setting("cur_seed", Int(low=0), None, "index of the run's seed, set by MMSA_run", _RUN, nullable=True),
    Setting("model_save_path", PathLike(), None, "checkpoint path, set by MMSA_run from model_save_dir", _RUN,
            nullable=True),
    Setting("model_save_base", PathLike(), None, "MMSA_run's model_save_path before the per-seed suffix of "
            "EMT-DLFR's checkpoints", _RUN, nullable=True),
    Setting("model_save_dir", PathLike(), None, "MMSA_run's model_save_dir", _RUN, nullable=True),
    Setting("res_save_dir", PathLike(), None, "MMSA_run's res_save_dir", _RUN, nullable=True),
    Setting("log_dir", PathLike(), None, "MMSA_run's log_dir", _RUN, nullable=True),
    Setting("config_file", PathLike(), None, "the config file read", _RUN, nullable=True),
    Setting("feature_hint", Anything("str"), "", "how featurePath was built (for error messages)", _RUN),
    Setting("d_paras", Anything("list of str"), None, "keys a tuning run samples (debugParams)", _RUN,
            nullable=True),
)

# keys MMSA's own trainers read for every model: checked for them too; their other keys are theirs
SHARED_KEYS = ("batch_size", "KeyEval", "early_stop", "update_epochs", "data_missing", "missing_rate",
               "missing_seed", "use_bert", "use_finetune", "need_data_aligned", "need_model_aligned",
               "need_normalized")


# ----------------------------------------------------------------------------------------------- reading and checking
def get(args: Mapping[str, Any], name: str) -> Any:
    """The checked value of ``name`` in ``args``, or its default from the table; a required key that is absent
    is a KeyError naming it."""
    setting = SETTINGS[name]
    if name not in args:
        if setting.default is REQUIRED:
            raise KeyError(f"config key '{name}' is missing for model '{args.get('model_name')}' "
                           f"({_where(args)})")
        return list(setting.default) if isinstance(setting.default, list) else setting.default
    return setting.check(args[name], args)


def metric_keys(dataset_name: str) -> list[str] | None:
    """The validation results of ``dataset_name``'s metric function (MMSA's MetricsTop, or
    ``mmsa_emt.metrics``), found by calling it once on a fixed input; None if no metric knows the dataset."""
    function: Callable | None = DATASET_METRICS.get(dataset_name.lower())
    if function is None:
        try:
            function = MetricsTop("regression").getMetics(dataset_name)
        except KeyError:
            return None
    pred = torch.linspace(-3.0, 3.0, 16).reshape(-1, 1)
    with warnings.catch_warnings():  # scores of the fixed input are not looked at, only their names
        warnings.simplefilter("ignore")
        return list(function(pred, pred.flip(0)))


def key_eval_choices(args: Mapping[str, Any], ours: bool) -> list[str] | None:
    metrics = metric_keys(str(args.get("dataset_name", "")))
    if metrics is None:
        return None
    return [*metrics, *(LOSS_KEYS if ours else LOSS_KEYS[:1])]


def suggestion(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key_error(names: Sequence[str], where: str) -> SettingError:
    keys = ", ".join(f"'{n}'{suggestion(n, SETTINGS)}" for n in names)
    return SettingError(f"unknown config key{'s' if len(names) > 1 else ''} for EMT-DLFR: {keys}, in {where}; "
                        "docs/configuration.md lists every key")


def check_entry(entry: Mapping[str, Any], where: str) -> None:
    """Refuses keys of a config file section (``commonParams``, ``datasetParams.<dataset>``, ``debugParams``) of
    EMT-DLFR that the table does not know."""
    names = [k for k in entry if k not in SETTINGS]
    if names:
        raise unknown_key_error(names, where)


def _dataset_common_keys(args: Mapping[str, Any]) -> set[str]:
    """Keys the config file's datasetCommonParams gives this dataset: shared with MMSA's models, not EMT-DLFR's to
    refuse (a dataset entry may carry keys for other models)."""
    file = args.get("config_file")
    if not file or not Path(file).is_file():
        return set()
    datasets = json.loads(Path(file).read_text(encoding="utf-8")).get("datasetCommonParams", {})
    layouts = datasets.get(str(args.get("dataset_name", "")), {})
    return {k for layout in layouts.values() if isinstance(layout, dict) for k in layout}


def check_args(args: MutableMapping[str, Any], *, ours: bool) -> None:
    """Checks MMSA's merged args before any data is read or model built, and writes converted values back
    ("8" -> 8, "1e-3" -> 0.001). EMT-DLFR (``ours``): every key must be in the table (the error suggests the
    closest), every value fits its type and range, d_model divides by heads, KeyEval is a result the dataset's
    validation gives. MMSA's own models: only ``SHARED_KEYS`` and numeric learning rates / weight decays."""
    if ours:
        common = _dataset_common_keys(args)
        names = [k for k in args if k not in SETTINGS and k not in common]
        if names:
            raise unknown_key_error(names, f"{_where(args)} or the overrides (MMSA_run's config=, --set)")
        absent = [k for k, s in SETTINGS.items() if s.default is REQUIRED and k not in args]
        if absent:
            raise KeyError(f"config key{'s' if len(absent) > 1 else ''} {', '.join(repr(k) for k in absent)} "
                           f"{'are' if len(absent) > 1 else 'is'} missing for model '{args.get('model_name')}' "
                           f"({_where(args)})")
        for name in [k for k in args if k in SETTINGS]:
            args[name] = SETTINGS[name].check(args[name], args)
    else:
        if "data_missing" in args:
            args["data_missing"] = Setting("data_missing", Bool(), False, "", _MISSING).check(args["data_missing"],
                                                                                               args)
        skip = ("data_missing",) if args.get("data_missing") else ("data_missing", "missing_rate", "missing_seed")
        for name in SHARED_KEYS:
            if name in args and name not in skip:
                args[name] = SETTINGS[name].check(args[name], args)
        _check_builtin_rates(args)
    key = args.get("KeyEval")
    if key is not None:
        choices = key_eval_choices(args, ours)
        if choices is not None and key not in choices:
            raise SettingError(f"config key 'KeyEval' is {key!r} ({_where(args)}): must be one of "
                               f"{', '.join(choices)} (the validation results for {args.get('dataset_name')})")
    if ours:
        _check_ours(args)


def _check_builtin_rates(args: MutableMapping[str, Any]) -> None:
    """MMSA's models: learning rates > 0 and weight decays >= 0, where they are numbers or numeric strings
    (several MMSA models give per-part rates under other names)."""
    for name, value in list(args.items()):
        if name.startswith("learning_rate"):
            kind: Float = Float(0.0, low_open=True)
        elif name.startswith("weight_decay"):
            kind = Float(0.0)
        else:
            continue
        args[name] = Setting(name, kind, REQUIRED, "", _OPTIM).check(value, args)


def _check_ours(args: Mapping[str, Any]) -> None:
    """EMT-DLFR's checks across keys."""
    d_model, heads = args.get("d_model"), args.get("heads")
    if d_model is not None and heads is not None and d_model % heads:
        raise SettingError(f"config keys 'd_model' is {d_model} and 'heads' is {heads} ({_where(args)}): d_model "
                           "must be divisible by heads (each head gets d_model / heads dimensions)")
    if "text" in get(args, "modalities") and "use_bert" in args and not args["use_bert"]:
        raise SettingError(f"config key 'use_bert' is false ({_where(args)}): EMT-DLFR reads the text as BERT "
                           "token ids (text_bert); set use_bert to true, or leave text out of modalities")


# ----------------------------------------------------------------------------------------------- GPU choice
class _MMSADefaultGpuIds(list):
    """``MMSA_run``'s own default ``gpu_ids`` ([0]): a list equal to [0] that ``checked_assign_gpu`` tells apart,
    by identity, from a ``[0]`` the user wrote."""


MMSA_DEFAULT_GPU_IDS = _MMSADefaultGpuIds([0])  # put in MMSA_run's defaults by mmsa_emt.mmsa.patches


def checked_assign_gpu(gpu_ids: Sequence[int]) -> torch.device:
    """MMSA's ``assign_gpu``, which quietly runs on the CPU when the GPU asked for is not there: here an explicit
    ``gpu_ids`` naming a GPU this machine does not have is an error. ``gpu_ids=[]`` still asks for the automatic
    choice (the GPU with the most free memory, or the CPU without one); ``gpu_ids`` left at ``MMSA_run``'s default
    is GPU 0 where CUDA is available and the CPU elsewhere, as MMSA does, and the log says which."""
    if gpu_ids is MMSA_DEFAULT_GPU_IDS:
        device = _mmsa_assign_gpu([0] if torch.cuda.is_available() else [])
        logging.getLogger("MMSA").info(f"gpu_ids not given: running on {device}")
        return device
    ids = list(gpu_ids)
    if not ids:
        return _mmsa_assign_gpu(ids)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = (f"this machine has {count} CUDA GPU{'s' if count > 1 else ''} (ids 0 to {count - 1})" if count
            else "CUDA is not available here (no GPU, or a CPU-only PyTorch)")
    if len(ids) > 1:
        raise SettingError(f"gpu_ids={ids}: MMSA trains on one GPU; pass one id ({have})")
    gpu = ids[0]
    if isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu < count:
        raise SettingError(f"gpu_ids={ids}: {have}; pass gpu_ids=[] to choose automatically (the GPU with the "
                           "most free memory, else the CPU)")
    return _mmsa_assign_gpu(ids)


# ----------------------------------------------------------------------------------------------- documentation
def markdown_table(group: str) -> str:
    """The rows of one group of the table, as docs/configuration.md shows them."""
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS.values():
        if s.group == group:
            allowed = s.kind.range_text + (", or null" if s.nullable else "")
            rows.append(f"| `{s.name}` | {s.kind.type_text} | {s.default_text} | {allowed} | {s.doc} |")
    return "\n".join(rows)


def groups() -> list[str]:
    return list(dict.fromkeys(s.group for s in SETTINGS.values()))
