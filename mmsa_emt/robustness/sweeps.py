"""A whole sweep (``sweep``): settings checked, trials planned, those already in the results file skipped, the
others handed to an executor, each one's rows written the moment it ends, then the tables; and which checkpoints
are kept (``--keep-checkpoints``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic import write_text
from ..mmsa.config import load_config, trial_args
from ..mmsa.data import DEFAULT_MISSING_SEEDS
from ..normalize import sweep_normalization
from . import results, trial
from .digests import DIGEST_CACHE, config_hash
from .executors import ExecutorSettings, Failure, Job, run_jobs
from .plan import DEFAULT_SEEDS, TrialSpec, check_settings, plan_trials
from .results import (
    KEY_COLUMNS,
    LOG_COLUMN,
    _locked,
    _log_column_wanted,
    _normal_key,
    _plural,
    _row_keys,
    failures_path,
    read_results,
    record_failure,
    repair_results,
    results_path,
)
from .tables import SweepResult, report
from .trial import VALID_SCORE, prepare_incomplete_views

KEEP_CHECKPOINTS = ("all", "best", "none")


def sweep_missing_seeds(dataset: str, config_file: str | os.PathLike,
                        overrides: dict[str, Any] | None = None) -> list[int]:
    """The per-modality seeds of the dropped steps every model of a sweep gets: ``missing_seed`` from the sweep's
    overrides, else EMT-DLFR's config entry for ``dataset``, else the authors' default. MMSA's own entries carry
    other seeds (``[1111, 1111, 1111]``), so without one value for all, models would be compared on different
    incomplete views."""
    if overrides and overrides.get("missing_seed") is not None:
        seeds = overrides["missing_seed"]
    else:
        raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
        in_config = dataset in raw.get("emt-dlfr", {}).get("datasetParams", {})
        seeds = load_config("emt-dlfr", dataset, config_file).get("missing_seed") if in_config else None
    seeds = list(seeds) if seeds is not None else list(DEFAULT_MISSING_SEEDS)
    if len(seeds) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"missing_seed={seeds!r}: three whole numbers >= 0 (text, audio, vision) are wanted")
    return seeds


def sweep(models: str | Sequence[str], dataset: str, config_file: str | Path, *, rates: Sequence[float] | None = None,
          modality_rates: Sequence[Sequence[float]] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
          protocol: str = "per-rate", train_rate: float = 0.0, out_dir: str | Path = "saved_results/robustness",
          gpu_ids: Sequence[int] = (), num_workers: int = 0, overrides: dict | None = None, progress: bool = True,
          trial_fn: Callable[..., list[dict[str, Any]]] | None = None, echo: Callable[[str], None] = print,
          executor: str | ExecutorSettings = "local", keep_checkpoints: str = "all") -> SweepResult:
    """Runs every pending trial of a sweep, then writes and prints the tables and the plot. Every setting is
    checked before anything is trained (``check_settings``, the executor's options, and for ``run_trial`` each
    model's config with ``overrides``); damaged lines of the results file are moved aside and their trials run
    again (``repair_results``).

    ``executor``: 'local' (serial, in this process), 'ray', or an ``ExecutorSettings`` (Ray's address, CPUs and
    GPUs per trial, retries). Whatever runs the trials, this process alone writes the results file, one trial's
    rows the moment it ends; a trial that fails after its retries is recorded in ``failures_<dataset>.jsonl`` and
    named in the summary (``SweepResult.failed``), and runs again in the next sweep on this folder.
    ``keep_checkpoints``: 'all', 'best' (per model, configuration, protocol and training rates, only the weights
    of the seed with the best validation score; ``checkpoints/kept.json`` names them) or 'none'. ``trial_fn``
    runs one trial (default: ``run_trial``, looked up when the sweep starts)."""
    models = [models] if isinstance(models, str) else list(models)
    dataset = dataset.lower()
    settings, seeds, protocol, train_rate = check_settings(dataset, rates=rates, modality_rates=modality_rates,
                                                           seeds=seeds, protocol=protocol, train_rate=train_rate)
    runner = (executor if isinstance(executor, ExecutorSettings) else ExecutorSettings(kind=executor)).check()
    if keep_checkpoints not in KEEP_CHECKPOINTS:
        raise ValueError(f"--keep-checkpoints/keep_checkpoints={keep_checkpoints!r} is not one of "
                         f"{', '.join(KEEP_CHECKPOINTS)}")
    out_dir = Path(out_dir)
    csv_path = results_path(out_dir, dataset)

    # one input for every model: the sweep's --set normalize_features, else EMT-DLFR's entry; part of each hash
    overrides = {**(overrides or {}), "normalize_features": sweep_normalization(dataset, config_file, overrides)}
    echo(f"normalize_features={str(overrides['normalize_features']).lower()} for every model of the sweep")
    # one draw of missing steps for every model: MMSA's entries carry other missing_seed values than EMT-DLFR's
    overrides["missing_seed"] = sweep_missing_seeds(dataset, config_file, overrides)
    echo(f"missing_seed={overrides['missing_seed']} for every model of the sweep")
    digests = {m: config_hash(m, dataset, config_file, overrides, digest_cache=out_dir / DIGEST_CACHE)
               for m in models}
    trials = plan_trials(models, dataset, settings, seeds, protocol=protocol, train_rate=train_rate)
    done = repair_results(csv_path)
    pending = [t for t in trials if not set(_row_keys(t, digests[t.model])) <= done]
    echo(f"{len(trials)} trials, {len(trials) - len(pending)} already in {csv_path}, {len(pending)} to run"
         + (f" on Ray ({runner.cpus_per_trial or 1} CPU, {runner.gpus_per_trial:g} GPU per trial)"
            if runner.kind == "ray" and pending else ""))
    trial_fn = trial.run_trial if trial_fn is None else trial_fn
    if pending and trial_fn is trial.run_trial:
        for model in models:  # every setting of every model checked before the first trial starts
            trial_args(model, dataset, config_file, overrides=overrides,
                       gpu_ids=gpu_ids if runner.kind == "local" else [])
        prepare_incomplete_views(models, dataset, config_file, pending, overrides, out_dir, echo=echo)
    with_log = _log_column_wanted(csv_path)
    if not with_log:
        echo(f"{csv_path} was written without a '{LOG_COLUMN}' column; the per-trial log files are not named there")
    kwargs = {"out_dir": out_dir, "gpu_ids": list(gpu_ids) if runner.kind == "local" else [],
              "num_workers": num_workers, "overrides": overrides}
    if keep_checkpoints != "all":
        kwargs["keep_checkpoint"] = keep_checkpoints
    jobs = [Job(spec.tag, trial_fn, (spec, config_file), {**kwargs, "log_file": str(log_path(out_dir, spec))})
            for spec in pending]
    specs = {spec.tag: spec for spec in pending}
    failures: list[Failure] = []
    bar = tqdm(total=len(pending), desc=f"robustness {dataset}", unit="trial", disable=not progress or not pending)

    def finished(job: Job, rows: list[dict[str, Any]]) -> None:
        spec = specs[job.name]
        valid = [row.pop(VALID_SCORE, None) for row in rows]
        wanted = set(_row_keys(spec, digests[spec.model]))
        got = {_normal_key([row.get(c) for c in KEY_COLUMNS]) for row in rows}
        if got != wanted or len(rows) != len(wanted):
            raise ValueError(f"trial {spec.tag} returned rows for other keys than planned (config hash "
                             f"{digests[spec.model]}; did the config or the feature file change during the "
                             f"sweep?): {sorted(map(str, got))}")
        if with_log:
            for row in rows:
                row[LOG_COLUMN] = job.kwargs["log_file"]
        if keep_checkpoints == "best":
            _keep_best(out_dir, spec, digests[spec.model], rows[0]["checkpoint"], valid[0], echo=bar.write)
        results.append_rows(csv_path, rows)
        bar.update()
        bar.write(f"{spec.tag}: " + ", ".join(f"rate {r['rate_t']:g}/{r['rate_a']:g}/{r['rate_v']:g} MAE "
                                              f"{r['MAE']:.4f}" for r in rows))

    def failed(failure: Failure) -> None:
        spec = specs[failure.job.name]
        record_failure(failures_path(out_dir, dataset), spec, digests[spec.model], failure,
                       failure.job.kwargs["log_file"])
        failures.append(failure)
        bar.update()
        bar.write(f"{spec.tag}: FAILED after {failure.attempts} "
                  f"{_plural(failure.attempts, 'attempt', 'attempts')}: {failure.error}")

    with bar:
        run_jobs(jobs, runner, finished, failed)
    failed_tags = [f.job.name for f in failures]
    if failures:
        echo(f"\n{len(failures)} of {len(pending)} {_plural(len(pending), 'trial', 'trials')} failed (errors in "
             f"{failures_path(out_dir, dataset)}; they run again in the next sweep on this folder): "
             + "; ".join(f"{f.job.name}: {f.error}" for f in failures))
        if read_results(csv_path).empty:
            raise RuntimeError(f"every trial of the sweep failed; see {failures_path(out_dir, dataset)} and the "
                               f"logs in {out_dir / 'logs'}")
    result = report(out_dir, dataset, echo=echo, trained=len(pending) - len(failures))
    result.failed = failed_tags
    if failures:
        echo(f"NOTE: {len(failures)} failed {_plural(len(failures), 'trial is', 'trials are')} missing from these "
             f"tables: {', '.join(failed_tags)}")
    return result


def log_path(out_dir: str | Path, spec: TrialSpec) -> Path:
    """One log file per trial (a retried or resumed trial appends to it)."""
    return Path(out_dir) / "logs" / f"{spec.tag}.log"


def _keep_best(out_dir: Path, spec: TrialSpec, digest: str, checkpoint: str, valid: dict | None, *,
               echo: Callable[[str], None]) -> None:
    """``--keep-checkpoints best``: keeps the weights of the seed with the best validation score per (model,
    configuration, protocol, training rates), deletes the others, and names the kept ones in
    ``checkpoints/kept.json`` (written atomically before anything is deleted)."""
    if not valid:
        raise ValueError(f"trial {spec.tag} returned no validation score; --keep-checkpoints best needs one "
                         "(run_trial(keep_checkpoint='best') adds it)")
    kept_file = out_dir / "checkpoints" / "kept.json"
    kept_file.parent.mkdir(parents=True, exist_ok=True)
    rates = "-".join(f"{r:g}" for r in spec.train_rates)
    group = f"{spec.model}|{spec.dataset}|{digest}|{spec.protocol}|train {rates}"
    with _locked(kept_file, exclusive=True):
        kept = json.loads(kept_file.read_text(encoding="utf-8")) if kept_file.is_file() else {}
        best = kept.get(group)
        if best is None or best["checkpoint"] == checkpoint:  # the first, or the same trial run again
            better = True
        else:
            better = valid["value"] < best["valid"] if valid["minimize"] else valid["value"] > best["valid"]
        if better:
            kept[group] = {"checkpoint": checkpoint, "trial": spec.tag, "KeyEval": valid["key"],
                           "valid": valid["value"]}
            write_text(kept_file, json.dumps(kept, indent=1, sort_keys=True) + "\n")
            loser = best["checkpoint"] if best is not None and best["checkpoint"] != checkpoint else None
        else:
            loser = checkpoint
        if loser:
            Path(loser).unlink(missing_ok=True)
            echo(f"{group}: deleted {loser} (its valid {valid['key']} is not the best of the seeds)")
