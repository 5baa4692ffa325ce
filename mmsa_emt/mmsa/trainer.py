"""EMT-DLFR behind MMSA's trainer interface: ``EMTDLFRTrainer.do_train``/``do_test`` over ``mmsa_emt.trainer``,
with one checkpoint per seed whose name is reserved at once and never overwrites an earlier one."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from easydict import EasyDict
from MMSA.utils import MetricsTop, dict_to_str
from torch import nn

from .. import checkpoint
from ..trainer import FitResult, build_optimizer, evaluate, fit
from .config import translate
from .data import _Batches

logger = logging.getLogger("MMSA")
MINIMIZED_KEYS = ("Loss", "Loss(pred_m)", "MAE", "RMSE")
EpochCallback = Callable[[int, dict[str, float], dict[str, float]], None]  # (epoch, train results, valid results)


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
        self.config = run = translate(args)  # checked before the first batch
        self.device, self.weights, self.training = run.device, run.loss, run.training
        self.key_metric = run.training.key_eval
        self.metric_fn = MetricsTop("regression").getMetics(args["dataset_name"])  # ours too, see patches.PATCHES
        self.progress = run.training.verbose_level > 0
        self.speed = run.speed
        asked = args.get("precision")  # as written, before 'auto' was resolved
        how = " ('auto': bf16 where the device multiplies it natively)" if asked == "auto" else ""
        self.authors_training = run.training.authors_training
        if self.authors_training:  # docs/differences.md: the authors' training semantics
            if self.speed.precision != "fp32":
                how = f" (authors_training: fp32 as the authors, not precision={asked!r})"
            self.speed = dataclasses.replace(self.speed, precision="fp32")
            logger.info("authors_training: fp32, and each epoch's last partial accumulation group dropped as the "
                        "authors' loop does")
        logger.info(f"precision {self.speed.precision} on {self.device}{how}")

    def metrics(self, preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return _plain(self.metric_fn(preds, labels))

    def train(self, model: nn.Module, dataloader: Mapping[str, Any], *, save_path: Path,
              progress: bool | None = None, on_epoch_end: EpochCallback | None = None) -> FitResult:
        """Trains ``model.Model`` on the train split, early-stopped on the valid split, with ``fit`` and this run's
        translated config (optimizer, loss weights, speed, key metric, epochs, accumulation, authors' semantics);
        the best weights go to ``save_path`` with the config they need (``checkpoint.metadata``). ``progress``:
        None follows ``verbose_level``."""
        net = model.Model
        self.speed.prepare_model(net)
        return fit(net, _Batches(dataloader["train"]), _Batches(dataloader["valid"]),
                   optimizer=build_optimizer(net, self.config.optim), weights=self.weights,
                   metric_fn=self.metrics, key_metric=self.key_metric,
                   minimize=self.key_metric in MINIMIZED_KEYS, early_stop=self.training.early_stop,
                   max_epochs=self.training.max_epochs, update_every=self.training.update_epochs,
                   save_path=save_path, checkpoint_prefix=checkpoint.MMSA_PREFIX, device=self.device,
                   checkpoint_meta=checkpoint.metadata(net, self.args),
                   progress=self.progress if progress is None else progress, logger=logger,
                   on_epoch_end=on_epoch_end, speed=self.speed,
                   last_partial_group="drop" if self.authors_training else "step")

    def do_train(self, model: nn.Module, dataloader: Mapping[str, Any], return_epoch_results: bool = False):
        args = self.args
        save_path = _checkpoint_path(args)
        args["model_save_path"] = save_path  # MMSA's _run reloads the best weights from here
        history: dict[str, list] = {"train": [], "valid": [], "test": []}

        def on_epoch_end(epoch: int, train: dict[str, float], valid: dict[str, float]) -> None:
            if return_epoch_results:
                history["train"].append(train)
                history["valid"].append(valid)
                history["test"].append(self.do_test(model, dataloader["test"], mode="TEST"))

        try:
            result = self.train(model, dataloader, save_path=save_path, on_epoch_end=on_epoch_end)
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
