"""Hyper-parameter search for EMT-DLFR on Ray Tune, selected on the validation split.

Each trial trains one configuration drawn from the search space (the ``debugParams`` of the tuning config, or a
``--space`` file) and reports its validation results after every epoch (``mmsa_emt.trainer.fit``'s
``on_epoch_end``), so that an early-stopping scheduler (ASHA) can stop weak trials. The configuration with the
best validation ``KeyEval`` is chosen; only then are its saved weights tested, once, and the test results
reported apart. (MMSA's own tuning mode, ``MMSA_run(..., is_tune=True)``, ranks its trials by their test results.)
A search stopped midway resumes from its folder: finished trials are kept, unfinished ones start again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .mmsa.config import check_args, is_ours, key_eval, load_config, make_args
from .mmsa.data import checked_data_loader
from .mmsa.models import AMIO, ATIO, display_name, load_trained
from .mmsa.run import seed_everything
from .mmsa.trainer import MINIMIZED_KEYS
from .registry import canonical_name
from .robustness.executors import ExecutorSettings, Failure, Job, limit_threads, require_ray, run_jobs

SCHEDULERS = ("fifo", "asha")
SCORE = "valid_score"  # the validation KeyEval, as reported to Tune after every epoch


@dataclass
class TuneResult:
    """The chosen configuration, its validation score, its test results (computed after the search) and the
    table of every trial."""

    best_config: dict[str, Any]
    key_metric: str
    valid_score: float
    test: dict[str, float]
    trials: list[dict[str, Any]]
    files: dict[str, Path]


def search_space(model: str, dataset: str, config_file: str | Path, space_file: str | Path | None = None
                 ) -> dict[str, list[Any]]:
    """The choices of each searched key: ``debugParams`` of the model's entry in ``config_file`` (``d_paras``
    names the keys), or a JSON file ``{"key": [choice, ...], ...}``. Every choice is checked like a config value."""
    base = base_args(model, dataset, config_file)
    if space_file is None:
        raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
        debug = raw[canonical_name(model) or model.lower()]["debugParams"]
        names = debug.get("d_paras", [])
        where = f"{config_file} (debugParams)"
        space = {name: debug[name] for name in names if name in debug}
        if missing := [name for name in names if name not in debug]:
            raise KeyError(f"{where}: d_paras names {missing} without a list of choices")
    else:
        where = str(space_file)
        space = json.loads(Path(space_file).read_text(encoding="utf-8"))
        if not isinstance(space, dict):
            raise ValueError(f"{where}: a JSON object {{\"key\": [choice, ...]}} is wanted")
    if not space:
        raise ValueError(f"{where}: the search space is empty")
    unset = [key for key in _sampled_keys(model, config_file) if key not in base and key not in space]
    if unset:
        raise ValueError(f"{where}: {unset} are searched in debugParams but have no fixed value in commonParams or "
                         f"datasetParams.{dataset.lower()} of {config_file}; add them to the search space or give "
                         "them a value there")
    for key, choices in space.items():
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: '{key}' must map to a non-empty list of choices, got {choices!r}")
        for choice in choices:
            check_args(make_args({**base, key: choice}))
    return space


def base_args(model: str, dataset: str, config_file: str | Path, overrides: dict | None = None) -> dict[str, Any]:
    """The tuning config's args of ``model`` on ``dataset`` with ``overrides``, checked; for mmsa-emt's models only.
    MMSA's reader draws a random choice for every ``debugParams`` key; here those keys take their fixed value from
    ``commonParams``/``datasetParams`` instead (a trial then sets the keys of its search space), so that keys left
    out of a ``--space`` file do not change from one trial to the next."""
    args = load_config(model, dataset, config_file, tune=True)
    if not is_ours(args):
        raise ValueError(f"tune searches mmsa-emt's models (EMT-DLFR); for MMSA's '{model}' use "
                         "MMSA_run(..., is_tune=True), which ranks its trials on the test split")
    entry = json.loads(Path(config_file).read_text(encoding="utf-8"))[canonical_name(model) or model.lower()]
    fixed = {**entry.get("commonParams", {}), **entry.get("datasetParams", {}).get(dataset.lower(), {})}
    for key in entry.get("debugParams", {}).get("d_paras", []):
        if key in fixed:
            args[key] = fixed[key]
        else:
            args.pop(key, None)  # the search space sets it (search_space checks that it does)
    args.update(overrides or {})
    args.update(train_mode="regression", custom_feature=None, feature_T=None, feature_A=None, feature_V=None)
    check_args(args)
    return args


def _sampled_keys(model: str, config_file: str | Path) -> list[str]:
    entry = json.loads(Path(config_file).read_text(encoding="utf-8"))[canonical_name(model) or model.lower()]
    return list(entry.get("debugParams", {}).get("d_paras", []))


def _trial_model(args: dict[str, Any], seed: int, num_workers: int) -> tuple[Any, Any, dict]:
    """Seeds, then builds the loaders, the model and our trainer, as MMSA's ``_run`` does."""
    seed_everything(seed)
    loaders = checked_data_loader(args, num_workers)
    model = AMIO(args).to(args["device"])
    return model, ATIO().getTrain(args), loaders


def train_trial(config: dict[str, Any], *, base: dict, out_dir: str, seed: int, num_workers: int,
                threads: int | None, device: str, report: Callable[[dict], None] | None = None) -> dict[str, float]:
    """One Tune trial: trains ``base`` updated with ``config`` and reports the validation results after every
    epoch; the best epoch's weights, with their config (``mmsa_emt.from_pretrained`` loads them), go to
    ``<out_dir>/trials/<trial id>.pth``. The test split is not read."""
    if threads is not None:
        limit_threads(threads)
    if report is None:
        from ray import tune

        report, trial_id = tune.report, tune.get_context().get_trial_id()
    else:
        trial_id = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    args = make_args(copy.deepcopy(base))
    args.update(config)
    args["device"] = torch.device(device)
    check_args(args)
    save_path = Path(out_dir) / "trials" / f"{trial_id}.pth"
    save_path.parent.mkdir(parents=True, exist_ok=True)
    args["model_save_path"] = save_path
    model, trainer, loaders = _trial_model(args, seed, num_workers)
    key = trainer.key_metric

    def on_epoch_end(epoch: int, train: dict[str, float], valid: dict[str, float]) -> None:
        report({SCORE: float(valid[key]), "epoch": epoch, "checkpoint": str(save_path),
                **{f"valid_{k}": float(v) for k, v in valid.items() if k.isidentifier()}})

    result = trainer.train(model, loaders, save_path=save_path, progress=False, on_epoch_end=on_epoch_end)
    return {SCORE: float(result.best_value), "checkpoint": str(save_path)}


def evaluate_checkpoint(args: dict, checkpoint: str, seed: int, num_workers: int, device: str | None = None
                    ) -> dict[str, float]:
    """The test results of the weights in ``checkpoint``: run once, after the search has chosen them."""
    args = make_args(copy.deepcopy(args))
    args["device"] = torch.device(device or "cpu")
    args["model_save_path"] = Path(checkpoint)
    model, trainer, loaders = _trial_model(args, seed, num_workers)
    load_trained(model, checkpoint)
    results = trainer.do_test(model, loaders["test"], mode="TEST")
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}


def tune_model(model: str, dataset: str, config_file: str | Path, *, trials: int, out_dir: str | Path,
               space_file: str | Path | None = None, executor: ExecutorSettings | None = None,
               scheduler: str = "fifo", seed: int = 1111, num_workers: int = 0, overrides: dict | None = None,
               echo: Callable[[str], None] = print) -> TuneResult:
    """Searches ``trials`` configurations of ``model`` on Ray Tune, selects on the validation split, then tests
    the chosen weights once. ``executor``: 'local' runs one trial at a time on a local Ray; 'ray' runs as many as
    the cluster's resources allow (``cpus_per_trial``, ``gpus_per_trial``). Rerunning with the same ``out_dir``
    resumes the search; other settings there are an error."""
    runner = (executor or ExecutorSettings(kind="ray")).check()
    ray = require_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials/trials={trials!r} must be a whole number >= 1")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler/scheduler={scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    base = base_args(model, dataset, config_file, overrides)
    space = search_space(model, dataset, config_file, space_file)
    key = key_eval(base)
    mode = "min" if key in MINIMIZED_KEYS else "max"
    out_dir = Path(out_dir).resolve()
    name = f"{display_name(model)}-{dataset.lower()}"
    _check_same_search(out_dir / "tune_settings.json", {
        "model": name, "space": space, "trials": trials, "seed": seed, "scheduler": scheduler,
        "base": {k: v for k, v in base.items() if k not in ("device", "config_file", "feature_hint")}})
    gpus, cpus = runner.gpus_per_trial, runner.cpus_per_trial or 1
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=dict(base), out_dir=str(out_dir), seed=seed, num_workers=num_workers,
                             threads=runner.threads, device="cuda:0" if gpus > 0 else "cpu"),
        {"cpu": cpus, "gpu": gpus})
    max_epochs = base.get("max_epochs")
    tune_config = tune.TuneConfig(
        metric=SCORE, mode=mode, num_samples=trials,
        search_alg=BasicVariantGenerator(random_state=seed),
        scheduler=ASHAScheduler(time_attr="epoch", max_t=int(max_epochs or 100), grace_period=1)
        if scheduler == "asha" else None,
        max_concurrent_trials=1 if runner.kind == "local" else None)
    started = False
    if not ray.is_initialized():
        ray.init(address=runner.address, include_dashboard=False)
        started = True
    try:
        path = out_dir / "ray_tune" / name
        if tune.Tuner.can_restore(str(path)):
            echo(f"resuming the search in {path}")
            tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space={k: tune.choice(v) for k, v in space.items()},
                               tune_config=tune_config,
                               run_config=tune.RunConfig(storage_path=str(out_dir / "ray_tune"), name=name,
                                                         verbose=0))
        grid = tuner.fit()
        table = []
        for result in grid:
            row = {**{k: result.config.get(k) for k in space},
                   "epochs": (result.metrics or {}).get("epoch"), "error": str(result.error) if result.error else ""}
            frame = result.metrics_dataframe
            best = (frame[SCORE].min() if mode == "min" else frame[SCORE].max()) if frame is not None \
                and SCORE in frame else math.nan
            row[f"valid {key}"] = float(best)
            row["checkpoint"] = (result.metrics or {}).get("checkpoint", "")
            table.append(row)
        finished = [r for r in table if not math.isnan(r[f"valid {key}"])]
        if not finished:
            raise RuntimeError(f"no trial of the search reported a validation result; see {path}")
        best_row = (min if mode == "min" else max)(finished, key=lambda r: r[f"valid {key}"])
        best_config = {k: best_row[k] for k in space}
        echo(f"\n{len(table)} trials; each scored on the VALIDATION split ({key}, {mode}):")
        for row in table:
            echo("  " + ", ".join(f"{k}={row[k]}" for k in space) + f" -> valid {key} {row[f'valid {key}']:.4f}"
                 + (f" ({row['error']})" if row["error"] else ""))
        echo(f"chosen on validation: {best_config} (valid {key} {best_row[f'valid {key}']:.4f})")
        tested: dict[str, float] = {}

        def test_failed(failure: Failure) -> None:
            raise RuntimeError(f"testing the chosen weights ({best_row['checkpoint']}) failed: {failure.error}")

        job = Job("test", evaluate_checkpoint, ({**base, **best_config}, best_row["checkpoint"], seed, num_workers))
        run_jobs([job], ExecutorSettings(kind=runner.kind, address=runner.address, retries=0,
                                         cpus_per_trial=runner.cpus_per_trial, gpus_per_trial=gpus),
                 lambda _, results: tested.update(results), test_failed)
    finally:
        if started:
            ray.shutdown()
    echo("\nTEST results of the chosen configuration (computed once, after the search; not used to choose): "
         + ", ".join(f"{k} {v:.4f}" for k, v in tested.items()))
    files = {"result": out_dir / f"tune_{name}.json"}
    files["result"].write_text(json.dumps({
        "model": name, "selected_on": f"validation {key} ({mode})", "best_config": best_config,
        "valid": best_row[f"valid {key}"], "checkpoint": best_row["checkpoint"], "test": tested, "trials": table},
        indent=1, default=str) + "\n", encoding="utf-8")
    echo(f"written to {files['result']}")
    return TuneResult(best_config=best_config, key_metric=key, valid_score=best_row[f"valid {key}"], test=tested,
                      trials=table, files=files)


def _check_same_search(path: Path, wanted: dict[str, Any]) -> None:
    """Records a search's settings in its folder; a later run there with other settings would mix two searches."""
    text = json.dumps(wanted, sort_keys=True, default=str)
    if path.is_file():
        if json.loads(path.read_text(encoding="utf-8")) != json.loads(text):
            raise ValueError(f"{path.parent} holds a search with other settings (see {path}); use another --out")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
