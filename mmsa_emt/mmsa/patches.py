"""Every change mmsa-emt makes to MMSA's modules, in one table (``PATCHES``), and ``register()``, which applies it.

MMSA builds its model and trainer maps inside ``AMIO.__init__``/``ATIO.__init__`` and looks ``AMIO``, ``ATIO``,
``MMDataLoader``, the config readers and the other names below up as globals of ``MMSA.run`` at call time, so
replacing those globals with subclasses or wrappers that know our models hooks EMT-DLFR into ``MMSA_run`` and
``MMSA_test`` without editing MMSA's files. The same replacements carry the mends MMSA 2.2.1 needs today. Each row
names the test (``tests/test_mmsa_patches.py``) that fails when a new MMSA no longer needs the patch or breaks it;
``docs/mmsa.md`` shows the table as ``markdown_table`` writes it.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import MMSA.run as mmsa_run
import pandas as pd
import torch
from MMSA.utils import MetricsTop

from .. import settings
from ..metrics import DATASET_METRICS
from ..registry import list_models
from .config import _config_regression, _config_tune, _set_device_if_cuda
from .data import _MMDataset, _settings_checked_loader, _unpickled_once
from .inference import mmsa_test
from .mends import _MISA, _ReduceLROnPlateau, _TFRNet
from .models import AMIO, ATIO, _load_checkpoint
from .results import _mmsa_data_frame, _mmsa_read_csv, _run_noting_result_keys

logger = logging.getLogger("MMSA")
MMSA_VERSION = "2.2.1"  # the MMSA release every patch below was written against


class _Delegate:
    """Stands in for a module: selected attributes replaced, everything else read from the original."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        self.__dict__.update(_target=target, **overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _plain_round(number: Any, ndigits: int | None = None) -> Any:
    """``round`` that gives Python floats for numpy scalars, so MMSA's results CSV holds plain numbers."""
    value = builtins.round(number, ndigits)
    return float(value) if hasattr(value, "dtype") else value


_ORIGINAL_SET_LOGGER = mmsa_run._set_logger


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


_ORIGINAL_GET_METICS = MetricsTop.getMetics


def _get_metics(self: MetricsTop, dataset_name: str):
    """MMSA's metric lookup, extended with the datasets of ``mmsa_emt.metrics`` (for every trainer)."""
    extra = DATASET_METRICS.get(dataset_name.lower())
    return extra if extra is not None else _ORIGINAL_GET_METICS(self, dataset_name)


def _defaults_marking_gpu_ids(function: Any) -> tuple:
    """``function.__defaults__`` with the default of ``gpu_ids`` replaced by ``settings.MMSA_DEFAULT_GPU_IDS`` (equal
    to MMSA's [0]), so that ``checked_assign_gpu`` knows the user gave none."""
    positional = [p for p in inspect.signature(function).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty]
    names = [p.name for p in positional]
    defaults = list(function.__defaults__ or ())
    if "gpu_ids" in names and defaults[names.index("gpu_ids")] == [0]:
        defaults[names.index("gpu_ids")] = settings.MMSA_DEFAULT_GPU_IDS
    return tuple(defaults)


_ORIGINAL_RUN_DEFAULTS = mmsa_run.MMSA_run.__defaults__
_RUN_DEFAULTS = _defaults_marking_gpu_ids(mmsa_run.MMSA_run)

# ----------------------------------------------------------------------------------------------- the table
REPLACED, EXTENDED, SCOPED = "replaced", "extended", "scoped"  # how a patch changes its target


@dataclass(frozen=True)
class Patch:
    """One change to MMSA: ``target`` (module path and name), what it mends, and the test that watches it."""

    target: str  # e.g. "MMSA.run.MMDataLoader"
    how: str  # REPLACED by register(); EXTENDED by register() (a list given our names); SCOPED: swapped by ``by``
    by: Any  # the replacement (REPLACED), or the function that does the change (EXTENDED, SCOPED)
    mends: str
    canary: str  # the test in tests/test_mmsa_patches.py that fails when MMSA no longer needs it or breaks it
    mmsa: str = MMSA_VERSION


_TORCH = _Delegate(torch, cuda=_Delegate(torch.cuda, set_device=_set_device_if_cuda), load=_load_checkpoint)
_PANDAS = _Delegate(pd, read_csv=_mmsa_read_csv, DataFrame=_mmsa_data_frame)
_SCHEDULER = ("a scheduler that accepts the `verbose=True` this trainer passes and torch 2.13 refuses",
              "test_torch_refuses_the_verbose_mmsa_passes")


def _add_our_models(names: list[str]) -> None:
    """Appends the registered models' display names to MMSA's ``SUPPORTED_MODELS`` (each once)."""
    for name in list_models():
        if name.upper() not in names:
            names.append(name.upper())


PATCHES: tuple[Patch, ...] = (
    Patch("MMSA.run.AMIO", REPLACED, AMIO, "builds the registered models (MMSA's map raises KeyError); their "
          "weights load strictly, and an input without lengths must not end in padding",
          "test_mmsa_amio_knows_only_its_models"),
    Patch("MMSA.run.ATIO", REPLACED, ATIO, "gives the registered models their trainer (`EMTDLFRTrainer`)",
          "test_mmsa_atio_knows_only_its_models"),
    Patch("MMSA.run.MMDataLoader", REPLACED, _settings_checked_loader, "checks every setting and the feature file "
          "before any data is read, reads the file once, normalizes on load, zeroes NaN/inf audio/vision, drops "
          "a training batch of one sample", "test_mmsa_loader_checks_nothing"),
    Patch("MMSA.run.get_config_regression", REPLACED, _config_regression, "model aliases, errors naming the "
          "entry at fault, unknown keys refused, `dataset_root_dir` relative to the config file",
          "test_mmsa_config_readers_leave_paths_relative"),
    Patch("MMSA.run.get_config_tune", REPLACED, _config_tune, "the same for tuning configs",
          "test_mmsa_config_readers_leave_paths_relative"),
    Patch("MMSA.run.assign_gpu", REPLACED, settings.checked_assign_gpu, "a GPU asked for and absent is an error "
          "(MMSA quietly runs on the CPU)", "test_mmsa_assign_gpu_falls_back_to_the_cpu"),
    Patch("MMSA.run.MMSA_run.__defaults__", REPLACED, _RUN_DEFAULTS, "`gpu_ids` left at MMSA_run's default [0] "
          "is told apart from a `[0]` the user wrote: GPU 0 where CUDA is available, else the CPU, as MMSA does "
          "(an explicit absent GPU is an error)", "test_mmsa_run_defaults_to_gpu_0"),
    Patch("MMSA.run.torch", REPLACED, _TORCH, "`torch.cuda.set_device` is a no-op on the CPU (MMSA calls it "
          "unconditionally); `torch.load` names an empty, truncated or foreign weights file",
          "test_mmsa_sets_the_device_and_loads_through_torch"),
    Patch("MMSA.run.round", REPLACED, _plain_round, "plain numbers in the results CSV, not `np.float64(...)` "
          "text (numpy 2)", "test_mmsa_rounds_to_numpy_scalars"),
    Patch("MMSA.run._set_logger", REPLACED, _set_logger_once, "one set of log handlers however often MMSA_run is "
          "called; log lines carry the process id", "test_mmsa_set_logger_adds_handlers_on_each_call"),
    Patch("MMSA.run._run", REPLACED, _run_noting_result_keys, "notes the result names of a run, the columns of "
          "its row in the results CSV", "test_mmsa_results_row_must_match_the_file_columns"),
    Patch("MMSA.run.pd", REPLACED, _PANDAS, "MMSA_run's results row is added under a lock, to the union of the "
          "columns, atomically (`results.append_results`); MMSA's own fails on a row with other columns",
          "test_mmsa_results_row_must_match_the_file_columns"),
    Patch("MMSA.run.MMSA_test", REPLACED, mmsa_test, "our models' weights load strictly (MMSA: strict=False), a "
          "sample is read up to its lengths, errors name the file and key", "test_mmsa_test_loads_loosely"),
    Patch("MMSA.MMSA_test", REPLACED, mmsa_test, "the same for `from MMSA import MMSA_test` (MMSA's package binds "
          "the function itself)", "test_mmsa_test_loads_loosely"),
    Patch("MMSA.run.SUPPORTED_MODELS", EXTENDED, _add_our_models, "lists the registered models",
          "test_supported_models_lists_ours_once"),
    Patch("MMSA.data_loader.MMDataset", REPLACED, _MMDataset, "loads datasets beyond MMSA's three (e.g. "
          "avec2019) with MOSI's layout", "test_mmsa_dataset_knows_three_datasets"),
    Patch("MMSA.utils.MetricsTop.getMetics", REPLACED, _get_metics, "metrics of the datasets in "
          "`mmsa_emt.metrics` (AVEC2019) for every trainer", "test_mmsa_metrics_know_three_datasets"),
    *(Patch(f"{module}.ReduceLROnPlateau", REPLACED, _ReduceLROnPlateau, *_SCHEDULER) for module in
      ("MMSA.trains.singleTask.MULT", "MMSA.trains.singleTask.MMIM", "MMSA.trains.missingTask.TFR_NET")),
    Patch("MMSA.models.AMIO.MISA", REPLACED, _MISA, "MISA's text projection sized from the loaded encoder (MMSA: "
          "768) and audio/vision packed with lengths within their sequences", "test_mmsa_misa_projects_768_wide_text"),
    Patch("MMSA.models.AMIO.TFR_NET", REPLACED, _TFRNet, "TFR-Net uses the configured `pretrained` encoder "
          "(MMSA asks the hub for bert-base-uncased)", "test_mmsa_tfr_net_asks_for_bert_base"),
    Patch("MMSA.models.missingTask.TFR_NET.model.BertTextEncoder", SCOPED, _TFRNet, "while `mends._TFRNet` is "
          "built: the encoder class with `pretrained` and `transformers` bound",
          "test_mmsa_tfr_net_asks_for_bert_base"),
    Patch("MMSA.data_loader.pickle", SCOPED, _unpickled_once, "while a loader is built: MMSA's "
          "datasets get the feature file's content read (and checked, normalized) once instead of unpickling it "
          "once per split", "test_mmsa_datasets_unpickle_through_the_module_pickle"),
)


def _owner(target: str) -> tuple[Any, str]:
    """The object holding ``target``'s last name ('MMSA.utils.MetricsTop.getMetics' -> (MetricsTop, 'getMetics')):
    the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        try:
            owner = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a module that exists but fails to import: not a shorter prefix's business
                raise
            continue
        for name in parts[end:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise ModuleNotFoundError(f"no module in {target}")


def current(target: str) -> Any:
    """What ``target`` holds now."""
    owner, name = _owner(target)
    return getattr(owner, name)


def register() -> None:
    """Hooks mmsa-emt's models into ``MMSA_run``/``MMSA_test`` by applying ``PATCHES``; safe to call any number of
    times."""
    for patch in PATCHES:
        owner, name = _owner(patch.target)
        if patch.how == REPLACED:
            setattr(owner, name, patch.by)
        elif patch.how == EXTENDED:
            patch.by(getattr(owner, name))


def markdown_table() -> str:
    """``PATCHES`` as docs/mmsa.md shows it."""
    rows = ["| target | how | what it mends | MMSA | canary test |", "|---|---|---|---|---|"]
    for p in PATCHES:
        rows.append(f"| `{p.target}` | {p.how} | {p.mends} | {p.mmsa} | `{p.canary}` |")
    return "\n".join(rows)
