"""Tables and curves from a results file: mean and std over seeds per configuration (``summarize``), AUILC
(``auilc_table``, the area under the metric-vs-missing-rate curve), Markdown, and one plot per protocol
(``report`` writes them all)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .results import read_results, results_path

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
SHORT_HASH = 7  # characters of a config hash in table rows and plot legends


def metrics_for(dataset: str) -> list[tuple[str, str, float]]:
    """The paper's metric layout for ``dataset`` (MOSI's for a dataset not listed)."""
    return METRICS.get(dataset, METRICS["mosi"])


def metric_columns(dataset: str) -> list[str]:
    return [key for key, _, _ in metrics_for(dataset)] + ["Loss"]


@dataclass
class SweepResult:
    results: pd.DataFrame
    summary: pd.DataFrame
    auilc: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    trained: int = 0
    failed: list[str] = field(default_factory=list)  # tags of the trials that failed in this sweep


def summarize(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Mean and std over seeds per (model, configuration, protocol, rates), in the paper's units. Rows of different
    config hashes are never averaged together: where a model has more than one, its rows are labelled
    ``MODEL [abc1234]`` (short hash); the full hash is the last column, ``config_hash``."""
    scales = {key: scale for key, _, scale in metrics_for(dataset)}
    metrics = [m for m in scales if m in frame]
    scaled = frame.assign(**{m: frame[m] * scales[m] for m in metrics})
    if "config_hash" not in scaled:
        scaled = scaled.assign(config_hash="")
    groups = scaled.groupby(["model", "config_hash", "protocol", "rate_t", "rate_a", "rate_v"], sort=True,
                            dropna=False)[metrics]
    table = groups.mean().join(groups.std(ddof=0).add_suffix("_std")).join(groups.size().rename("seeds"))
    table = table.reset_index()
    table["model"] = config_labels(table)
    return table[[c for c in table if c != "config_hash"] + ["config_hash"]]


def config_labels(frame: pd.DataFrame) -> pd.Series:
    """Each row's model name, followed by its short config hash where that model has rows of several hashes."""
    hashes = frame.config_hash.astype(str)
    several = hashes.groupby(frame.model).transform("nunique") > 1
    width = SHORT_HASH
    while width < hashes.str.len().max() and hashes.str[:width].nunique() < hashes.nunique():
        width += 1  # two hashes that share their first characters get more of them
    return frame.model.where(~several, frame.model + " [" + hashes.str[:width] + "]")


def auilc(rates: Sequence[float], values: Sequence[float]) -> float:
    """Area under the metric-vs-missing-rate curve: the trapezoid rule over the rates actually run."""
    order = np.argsort(rates)
    return float(np.trapezoid(np.asarray(values, dtype=float)[order], np.asarray(rates, dtype=float)[order]))


def auilc_table(summary: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per (model, configuration, protocol): AUILC of the seed-mean curve for each metric, over
    uniform-rate settings; ``summary`` is ``summarize``'s table (model names already carry a short hash where
    needed)."""
    uniform = summary[(summary.rate_t == summary.rate_a) & (summary.rate_a == summary.rate_v)]
    rows = []
    if "config_hash" not in uniform:
        uniform = uniform.assign(config_hash="")
    for (model, protocol, digest), group in uniform.groupby(["model", "protocol", "config_hash"], sort=True,
                                                             dropna=False):
        if len(group) < 2:
            continue
        rates = group.rate_t.to_numpy()
        row = {"model": model, "protocol": protocol,
               "rates": f"{rates.min():g}-{rates.max():g} ({len(rates)} rates)"}
        for key, label, _ in metrics_for(dataset):
            if key in group:
                row[label] = auilc(rates, group[key].to_numpy())
        row["config_hash"] = digest
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-style table (no extra dependency)."""
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in frame.to_numpy()]
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    return "\n".join([header, rule, *("| " + " | ".join(r) + " |" for r in cells)])


def plot_curves(summary: pd.DataFrame, dataset: str, protocol: str, path: Path) -> Path:
    """Each metric against the missing rate: seed-mean line with a std band, one colour per model and
    configuration (the legend names the short config hash where a model has several)."""
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
        for i, ((model, _), group) in enumerate(data.groupby(["model", "config_hash"], sort=True, dropna=False)):
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
