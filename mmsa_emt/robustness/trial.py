"""One trial of a sweep: one model trained at given missing rates with one seed and tested at others, as MMSA's
``_run`` does (seeding, loaders, ``AMIO``, ``ATIO``, through ``mmsa_emt.mmsa``); ``run_trial`` returns its result
rows and shares no state with other trials, so any executor can run it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..mmsa.config import _set_device_if_cuda, feature_file, key_eval, load_config, trial_args
from ..mmsa.data import at_missing_rates, checked_data_loader, checked_test_loaders, reads_incomplete_view
from ..mmsa.models import AMIO, ATIO, load_trained
from ..mmsa.run import seed_everything
from ..mmsa.trainer import MINIMIZED_KEYS
from .digests import DIGEST_CACHE, config_hash
from .plan import TrialSpec
from .results import KEY_COLUMNS, _key_values
from .tables import metric_columns

logger = logging.getLogger("MMSA")  # MMSA's logger: ours and MMSA's trainers log there

VALID_SCORE = "_valid_score"  # set by run_trial for --keep-checkpoints best; never written to the results
NOT_KEPT = "not kept (--keep-checkpoints none)"


def run_trial(spec: TrialSpec, config_file: str | Path, *, out_dir: str | Path, gpu_ids: Sequence[int] = (),
              num_workers: int = 0, overrides: dict | None = None, device: str | None = None,
              log_file: str | Path | None = None, keep_checkpoint: str = "all") -> list[dict[str, Any]]:
    """Trains and tests one (model, rate, seed) and returns one row per test rate.

    ``device`` (set by the Ray executor: 'cuda:0', the task's own GPU, or 'cpu') replaces the choice from
    ``gpu_ids``; ``log_file`` receives this trial's log lines; ``keep_checkpoint``: 'none' deletes the weights once
    tested, 'best' adds the validation score (``VALID_SCORE``, the model's ``KeyEval`` at the training rates) that
    the sweep compares across seeds."""
    out_dir = Path(out_dir)
    start = time.time()
    with _trial_log(log_file):
        digest = config_hash(spec.model, spec.dataset, config_file, overrides, digest_cache=out_dir / DIGEST_CACHE)
        args = trial_args(spec.model, spec.dataset, config_file, overrides=overrides, gpu_ids=gpu_ids)
        if device is not None:
            args["device"] = torch.device(device)
        cache_dir = incomplete_dir(out_dir)
        results, checkpoint = run_missing_trial(
            args, seed=spec.seed, train_rates=spec.train_rates, test_rates=spec.test_rates,
            checkpoint=out_dir / "checkpoints" / f"{spec.tag}.pth", cache_dir=cache_dir, num_workers=num_workers)
        valid = _valid_score(args, spec, checkpoint, cache_dir, num_workers) if keep_checkpoint == "best" else None
        if keep_checkpoint == "none":
            Path(checkpoint).unlink(missing_ok=True)
            logger.info(f"{checkpoint} deleted after testing (--keep-checkpoints none)")
    seconds = round(time.time() - start, 2)
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for rates, metrics in zip(spec.test_rates, results):
        row = dict(zip(KEY_COLUMNS, _key_values(spec, rates, digest)))
        row.update({k: metrics.get(k, math.nan) for k in metric_columns(spec.dataset)})
        row.update(checkpoint=str(checkpoint) if keep_checkpoint != "none" else NOT_KEPT, seconds=seconds,
                   finished_at=finished)
        if valid is not None:
            row[VALID_SCORE] = valid
        rows.append(row)
    return rows


def incomplete_dir(out_dir: str | Path) -> Path:
    """The one shared folder of a sweep's derived feature files (incomplete views, normalized copies)."""
    return Path(out_dir) / ".incomplete"


@contextmanager
def _trial_log(log_file: str | Path | None) -> Iterator[None]:
    """Sends the lines of MMSA's logger (ours and MMSA's trainers log there) to ``log_file`` while a trial runs."""
    if log_file is None:
        yield
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [pid %(process)d] %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _valid_score(args: dict, spec: TrialSpec, checkpoint: Path, cache_dir: Path, num_workers: int) -> dict:
    """The trained weights' ``KeyEval`` on the validation split at the training rates (never the test split):
    what ``--keep-checkpoints best`` compares."""
    train_args = at_missing_rates(args, spec.train_rates, cache_dir)
    train_args["model_save_path"] = checkpoint
    loaders = checked_data_loader(train_args, num_workers)
    model = AMIO(train_args).to(train_args["device"])
    load_trained(model, checkpoint)
    trainer = ATIO().getTrain(train_args)
    key = key_eval(train_args)
    score = trainer.do_test(model, loaders["valid"], mode="VAL")
    if key not in score:
        raise KeyError(f"KeyEval='{key}' of {spec.model} is not among its validation results {sorted(score)}")
    return {"key": key, "value": float(score[key]), "minimize": key in MINIMIZED_KEYS}


def prepare_incomplete_views(models: Sequence[str], dataset: str, config_file: str | Path,
                             trials: Sequence[TrialSpec], overrides: dict, out_dir: Path,
                             echo: Callable[[str], None] = print) -> list[Path]:
    """Writes, before any trial starts, the derived feature files (``mmsa_emt.missing``) of the models that do not
    read MMSA's incomplete view themselves, once per (feature file, rates), into the sweep's shared folder; the
    trials then find them there instead of each writing its own."""
    written = []
    for model in models:
        if reads_incomplete_view(model):
            continue
        args = load_config(model, dataset, config_file)
        args.update(overrides)
        needed = sorted({r for t in trials if t.model == model for r in (t.train_rates, *t.test_rates)})
        for rates in needed:
            at = at_missing_rates(args, rates, incomplete_dir(out_dir))
            written.append(feature_file(at))
    if written:
        echo(f"{len(set(written))} incomplete-view feature files ready in {incomplete_dir(out_dir)}")
    return written


def run_missing_trial(args: dict[str, Any], *, seed: int, train_rates: Sequence[float],
                      test_rates: Sequence[Sequence[float]], checkpoint: Path, cache_dir: Path,
                      num_workers: int = 0) -> tuple[list[dict[str, float]], Path]:
    """Trains one model at ``train_rates`` with ``seed`` and tests it at each of ``test_rates``, as MMSA's
    ``_run`` does (seeding, loaders, AMIO, ATIO); returns the test results and the checkpoint written."""
    train_args = at_missing_rates(args, train_rates, cache_dir)
    train_args["model_save_path"] = checkpoint
    checkpoint.parent.mkdir(parents=True, exist_ok=True)  # MMSA's own trainers save without creating it
    _set_device_if_cuda(train_args["device"])
    seed_everything(seed)
    loaders = checked_data_loader(train_args, num_workers)
    model = AMIO(train_args).to(train_args["device"])
    trainer = ATIO().getTrain(train_args)
    trainer.do_train(model, loaders)
    saved = Path(train_args["model_save_path"])  # our trainer picks a per-seed name that overwrites nothing
    load_trained(model, saved)
    trained_at = loaders["test"]
    del loaders  # the training and validation splits are not needed for testing

    def same(rates: Sequence[float]) -> bool:
        return [float(r) for r in rates] == [float(r) for r in train_rates]

    # the other test rates' loaders, one at a time; for our models they share one read of the feature file
    others = checked_test_loaders((at_missing_rates(args, rates, cache_dir) for rates in test_rates
                                   if not same(rates)), num_workers)
    results = []
    for rates in test_rates:
        loader = trained_at if same(rates) else next(others)
        results.append({k: float(v) for k, v in trainer.do_test(model, loader, mode="TEST").items()
                        if isinstance(v, (int, float))})
    return results, saved
