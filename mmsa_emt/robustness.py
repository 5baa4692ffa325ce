"""Robustness to random feature missing: missing-rate sweeps, AUILC tables and curves (arXiv 2208.07589, Sec. 4.4,
Tables 6-7, Figs 4-6), for EMT-DLFR and MMSA's built-in models.

Protocols, named in every output so that they are never mixed up:

- ``per-rate`` (the paper's): for each rate r, one model per seed is trained and tested with every modality
  missing at r.
- ``train-once@R``: one model per seed is trained at rate R and tested at every rate (cheaper).

One trial = one call of ``run_trial(spec, ...)`` -> result rows, with no shared state, so trials can be handed to
any executor. Each finished trial is appended to ``results_<dataset>.csv`` at once; a rerun skips the trials already
there with the same config hash, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import mmsa_compat

Rates = tuple[float, float, float]
METRICS: dict[str, list[tuple[str, str, float]]] = {  # MMSA key, paper label, scale to the paper's units
    "mosi": [("MAE", "MAE", 1), ("Corr", "Corr", 1), ("Mult_acc_7", "Acc-7", 100), ("Mult_acc_5", "Acc-5", 100),
             ("Has0_acc_2", "Acc-2 has0", 100), ("Non0_acc_2", "Acc-2 non0", 100),
             ("Has0_F1_score", "F1 has0", 100), ("Non0_F1_score", "F1 non0", 100)],
    "sims": [("MAE", "MAE", 1), ("Corr", "Corr", 1), ("Mult_acc_5", "Acc-5", 100), ("Mult_acc_3", "Acc-3", 100),
             ("Mult_acc_2", "Acc-2", 100), ("F1_score", "F1", 100)],
}
METRICS["mosei"] = METRICS["mosi"]
METRICS["avec2019"] = [("CCC", "CCC", 1), ("MAE", "MAE", 1), ("RMSE", "RMSE", 1), ("Pearson", "Pearson r", 1)]
LOWER_IS_BETTER = {"MAE", "RMSE"}
DEFAULT_SEEDS = (111, 1111, 11111)
KEY_COLUMNS = ["model", "dataset", "protocol", "train_rate_t", "train_rate_a", "train_rate_v", "rate_t", "rate_a",
               "rate_v", "seed", "config_hash"]
TAIL_COLUMNS = ["checkpoint", "seconds", "finished_at"]
VOLATILE_ARGS = {"config_file", "feature_hint", "model_save_path", "device", "missing_rate", "cur_seed",
                 "custom_feature", "feature_T", "feature_A", "feature_V", "train_mode"}


def default_rates(dataset: str) -> list[float]:
    """The paper's sweep: 0.0..1.0 by 0.1 for MOSI/MOSEI, 0.0..0.5 for SIMS."""
    top = 0.5 if dataset == "sims" else 1.0
    return [round(r, 1) for r in np.arange(0.0, top + 1e-9, 0.1)]


def metrics_for(dataset: str) -> list[tuple[str, str, float]]:
    """The paper's metric layout for ``dataset`` (MOSI's for a dataset not listed)."""
    return METRICS.get(dataset, METRICS["mosi"])


def metric_columns(dataset: str) -> list[str]:
    return [key for key, _, _ in metrics_for(dataset)] + ["Loss"]


@dataclass(frozen=True)
class TrialSpec:
    """What one trial trains and tests."""

    model: str
    dataset: str
    protocol: str  # 'per-rate' or 'train-once@R'
    seed: int
    train_rates: Rates
    test_rates: tuple[Rates, ...]

    @property
    def tag(self) -> str:
        rates = "-".join(f"{r:g}" for r in self.train_rates)
        return f"{self.model}-{self.dataset}-{self.protocol}-r{rates}-seed{self.seed}"


def plan_trials(models: Sequence[str], dataset: str, settings: Sequence[Rates], seeds: Sequence[int], *,
                protocol: str = "per-rate", train_rate: float = 0.0) -> list[TrialSpec]:
    """Every trial of a sweep, rate-major (trials at one rate share a derived feature file)."""
    if protocol == "per-rate":
        return [TrialSpec(m, dataset, "per-rate", s, r, (r,)) for m in models for r in settings for s in seeds]
    if protocol == "train-once":
        train = (float(train_rate),) * 3
        return [TrialSpec(m, dataset, f"train-once@{train_rate:g}", s, train, tuple(settings))
                for m in models for s in seeds]
    raise ValueError(f"protocol='{protocol}' is not one of per-rate, train-once")


def config_hash(model: str, dataset: str, config_file: str | Path, overrides: dict | None = None) -> str:
    """Hash of everything that shapes a trial except its rates and seed (config values, feature file size)."""
    args = mmsa_compat.load_config(model, dataset, config_file)
    args.update(overrides or {})
    kept = {k: v for k, v in args.items() if k not in VOLATILE_ARGS}
    feature = Path(args["featurePath"])
    kept["feature_file"] = [str(feature), feature.stat().st_size if feature.exists() else None]
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_trial(spec: TrialSpec, config_file: str | Path, *, out_dir: str | Path, gpu_ids: Sequence[int] = (),
              num_workers: int = 0, overrides: dict | None = None) -> list[dict[str, Any]]:
    """Trains and tests one (model, rate, seed) and returns one row per test rate."""
    out_dir = Path(out_dir)
    start = time.time()
    args = mmsa_compat.trial_args(spec.model, spec.dataset, config_file, overrides=overrides, gpu_ids=gpu_ids)
    results, checkpoint = mmsa_compat.run_missing_trial(
        args, seed=spec.seed, train_rates=spec.train_rates, test_rates=spec.test_rates,
        checkpoint=out_dir / "checkpoints" / f"{spec.tag}.pth", cache_dir=out_dir / ".incomplete",
        num_workers=num_workers)
    seconds = round(time.time() - start, 2)
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    digest = config_hash(spec.model, spec.dataset, config_file, overrides)
    rows = []
    for rates, metrics in zip(spec.test_rates, results):
        row = dict(zip(KEY_COLUMNS, _key_values(spec, rates, digest)))
        row.update({k: metrics.get(k, math.nan) for k in metric_columns(spec.dataset)})
        row.update(checkpoint=str(checkpoint), seconds=seconds, finished_at=finished)
        rows.append(row)
    return rows


def results_path(out_dir: str | Path, dataset: str) -> Path:
    return Path(out_dir) / f"results_{dataset}.csv"


def read_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame()
    return pd.read_csv(path, on_bad_lines="skip", dtype={"config_hash": str})


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Appends rows (with a header for a new file) in one write, so a killed sweep leaves whole lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
        if header != columns:
            raise ValueError(f"{path} has other columns than this sweep writes; use another --out folder")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if new:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] for c in columns])
    with open(path, "a", newline="") as f:
        f.write(buffer.getvalue())
        f.flush()


def _done_keys(frame: pd.DataFrame) -> set[tuple]:
    if frame.empty:
        return set()
    return {tuple(row) for row in frame[KEY_COLUMNS].astype(str).itertuples(index=False)}


def _key_values(spec: TrialSpec, rates: Rates, digest: str) -> list[Any]:
    """The KEY_COLUMNS values of one result row."""
    return [mmsa_compat.display_name(spec.model), spec.dataset, spec.protocol, *map(float, spec.train_rates),
            *map(float, rates), spec.seed, digest]


def _row_keys(spec: TrialSpec, digest: str) -> list[tuple]:
    """The rows a finished trial left in the results CSV, as strings (how they read back)."""
    return [tuple(map(str, _key_values(spec, rates, digest))) for rates in spec.test_rates]


@dataclass
class SweepResult:
    results: pd.DataFrame
    summary: pd.DataFrame
    auilc: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    trained: int = 0


def sweep(models: str | Sequence[str], dataset: str, config_file: str | Path, *, rates: Sequence[float] | None = None,
          modality_rates: Sequence[Sequence[float]] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
          protocol: str = "per-rate", train_rate: float = 0.0, out_dir: str | Path = "saved_results/robustness",
          gpu_ids: Sequence[int] = (), num_workers: int = 0, overrides: dict | None = None, progress: bool = True,
          trial_fn: Callable[..., list[dict[str, Any]]] = run_trial, echo: Callable[[str], None] = print,
          ) -> SweepResult:
    """Runs every pending trial of a sweep, then writes and prints the tables and the plot."""
    models = [models] if isinstance(models, str) else list(models)
    dataset = dataset.lower()
    if modality_rates:
        settings = [tuple(float(r) for r in triple) for triple in modality_rates]
        if any(len(s) != 3 for s in settings):
            raise ValueError("each --modality-rates setting needs three rates: text audio vision")
    else:
        settings = [(float(r),) * 3 for r in (default_rates(dataset) if rates is None else rates)]
    if any(not 0.0 <= r <= 1.0 for s in settings for r in s):
        raise ValueError(f"missing rates must lie in [0, 1], got {settings}")
    out_dir = Path(out_dir)
    csv_path = results_path(out_dir, dataset)
    from .normalize import sweep_normalization

    # one input for every model: the sweep's --set normalize_features, else EMT-DLFR's entry; part of each hash
    overrides = {**(overrides or {}), "normalize_features": sweep_normalization(dataset, config_file, overrides)}
    echo(f"normalize_features={str(overrides['normalize_features']).lower()} for every model of the sweep")
    digests = {m: config_hash(m, dataset, config_file, overrides) for m in models}
    done = _done_keys(read_results(csv_path))
    trials = plan_trials(models, dataset, settings, seeds, protocol=protocol, train_rate=train_rate)
    pending = [t for t in trials if not set(_row_keys(t, digests[t.model])) <= done]
    echo(f"{len(trials)} trials, {len(trials) - len(pending)} already in {csv_path}, {len(pending)} to run")
    with tqdm(pending, desc=f"robustness {dataset}", unit="trial", disable=not progress or not pending) as bar:
        for spec in bar:
            rows = trial_fn(spec, config_file, out_dir=out_dir, gpu_ids=gpu_ids, num_workers=num_workers,
                            overrides=overrides)
            append_rows(csv_path, rows)
            bar.write(f"{spec.tag}: " + ", ".join(f"rate {r['rate_t']:g}/{r['rate_a']:g}/{r['rate_v']:g} MAE "
                                                  f"{r['MAE']:.4f}" for r in rows))
    return report(out_dir, dataset, echo=echo, trained=len(pending))


def summarize(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Mean and std over seeds per (model, protocol, rates), in the paper's units."""
    scales = {key: scale for key, _, scale in metrics_for(dataset)}
    metrics = [m for m in scales if m in frame]
    scaled = frame.assign(**{m: frame[m] * scales[m] for m in metrics})
    groups = scaled.groupby(["model", "protocol", "rate_t", "rate_a", "rate_v"], sort=True)[metrics]
    table = groups.mean().join(groups.std(ddof=0), rsuffix="_std").join(groups.size().rename("seeds"))
    return table.reset_index()


def auilc(rates: Sequence[float], values: Sequence[float]) -> float:
    """Area under the metric-vs-missing-rate curve: the trapezoid rule over the rates actually run."""
    order = np.argsort(rates)
    return float(np.trapezoid(np.asarray(values, dtype=float)[order], np.asarray(rates, dtype=float)[order]))


def auilc_table(summary: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per (model, protocol): AUILC of the seed-mean curve for each metric, over uniform-rate settings."""
    uniform = summary[(summary.rate_t == summary.rate_a) & (summary.rate_a == summary.rate_v)]
    rows = []
    for (model, protocol), group in uniform.groupby(["model", "protocol"], sort=True):
        if len(group) < 2:
            continue
        rates = group.rate_t.to_numpy()
        row = {"model": model, "protocol": protocol,
               "rates": f"{rates.min():g}-{rates.max():g} ({len(rates)} rates)"}
        for key, label, _ in metrics_for(dataset):
            if key in group:
                row[label] = auilc(rates, group[key].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-style table (no extra dependency)."""
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in frame.to_numpy()]
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    return "\n".join([header, rule, *("| " + " | ".join(r) + " |" for r in cells)])


def plot_curves(summary: pd.DataFrame, dataset: str, protocol: str, path: Path) -> Path:
    """Each metric against the missing rate: seed-mean line with a std band, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = summary[(summary.protocol == protocol) & (summary.rate_t == summary.rate_a)
                   & (summary.rate_a == summary.rate_v)]
    metrics = [(k, label) for k, label, _ in metrics_for(dataset) if k in data]
    cols = 4 if len(metrics) > 6 else 3
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics):
        for i, (model, group) in enumerate(data.groupby("model", sort=True)):
            group = group.sort_values("rate_t")
            x, y, s = group.rate_t.to_numpy(), group[key].to_numpy(), group[f"{key}_std"].to_numpy()
            ax.plot(x, y, marker="o", ms=3, color=f"C{i}", label=model)
            ax.fill_between(x, y - s, y + s, color=f"C{i}", alpha=0.2)
        ax.set_title(label + (" (lower is better)" if key in LOWER_IS_BETTER else ""))
        ax.set_xlabel("missing rate")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.suptitle(f"{dataset.upper()}: robustness to random feature missing ({protocol}; mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out_dir: str | Path, dataset: str, *, echo: Callable[[str], None] = print,
           trained: int = 0) -> SweepResult:
    """Tables (terminal, CSV, Markdown) and one PNG per protocol from everything in ``results_<dataset>.csv``."""
    out_dir = Path(out_dir)
    frame = read_results(results_path(out_dir, dataset))
    if frame.empty:
        raise FileNotFoundError(f"no results in {results_path(out_dir, dataset)}")
    summary, files = summarize(frame, dataset), {}
    table = auilc_table(summary, dataset)
    for protocol in sorted(summary.protocol.unique()):
        stem = f"{dataset}_{protocol}"
        part = summary[summary.protocol == protocol]
        files[f"summary {protocol}"] = _save(part, out_dir / f"summary_{stem}")
        files[f"plot {protocol}"] = plot_curves(summary, dataset, protocol, out_dir / f"robustness_{stem}.png")
        echo(f"\n{dataset.upper()} [{protocol}] metric per missing rate (mean over seeds; accuracies and F1 in %):")
        cols = ["model", "rate_t", "rate_a", "rate_v", "seeds",
                *[k for k, _, _ in metrics_for(dataset) if k in part]]
        echo(part[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        auilc_part = table[table.protocol == protocol] if not table.empty else table
        if not auilc_part.empty:
            files[f"auilc {protocol}"] = _save(auilc_part, out_dir / f"auilc_{stem}")
            echo(f"\n{dataset.upper()} [{protocol}] AUILC (trapezoid over the rates run; MAE/Corr as they are, "
                 "accuracies and F1 in %):")
            echo(auilc_part.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    echo("\n" + "\n".join(f"{name}: {path}" for name, path in files.items()))
    return SweepResult(results=frame, summary=summary, auilc=table, files=files, trained=trained)


def _save(frame: pd.DataFrame, stem: Path) -> Path:
    """Writes <stem>.csv and <stem>.md (stems hold dots, as in 'train-once@0.5': no with_suffix)."""
    stem.parent.joinpath(stem.name + ".md").write_text(to_markdown(frame) + "\n")
    frame.to_csv(stem.parent / (stem.name + ".csv"), index=False)
    return stem.parent / (stem.name + ".csv")
