"""Robustness to random feature missing: missing-rate sweeps, AUILC tables and curves (arXiv 2208.07589, Sec. 4.4,
Tables 6-7, Figs 4-6), for EMT-DLFR and MMSA's built-in models.

Protocols, named in every output so that they are never mixed up:

- ``per-rate`` (the paper's): for each rate r, one model per seed is trained and tested with every modality
  missing at r.
- ``train-once@R``: one model per seed is trained at rate R and tested at every rate (cheaper).

One trial = one call of ``run_trial(spec, ...)`` -> result rows, with no shared state, so trials can be handed to
any executor. Each finished trial's rows are appended to ``results_<dataset>.csv`` at once, whole (``append_rows``,
the only writer; ``read_results`` is the only reader); a rerun skips the trials already there with the same config
hash (config values and the feature file's content), so an interrupted sweep resumes where it stopped. A line cut
mid-write is moved to ``results_<dataset>.csv.damaged`` and its trial runs again; tables and plots keep
configurations apart.

One module per concern:

- ``plan``: the sweep's settings, checked before anything is trained, and its trials (``TrialSpec``);
- ``digests``: ``config_hash``, which tells configurations apart (config values, feature file content);
- ``results``: the results file (``append_rows``, ``read_results``, ``repair_results``, locking) and failures;
- ``tables``: summary over seeds, AUILC, Markdown and plots (``report``);
- ``trial``: one trial (``run_trial``), driving MMSA through ``mmsa_emt.mmsa``;
- ``sweeps``: ``sweep`` itself and which checkpoints are kept;
- ``executors``: where trials run, in this process or on Ray.
"""

from .digests import DIGEST_CACHE, VOLATILE_ARGS, config_hash, file_digest
from .executors import EXECUTORS, ExecutorSettings, Failure, Job, RayMissingError, run_jobs
from .plan import DEFAULT_SEEDS, OPTIONS, PROTOCOLS, Rates, TrialSpec, check_settings, default_rates, plan_trials
from .results import (
    KEY_COLUMNS,
    LOG_COLUMN,
    TAIL_COLUMNS,
    DamagedResultsWarning,
    ReplacedResultsWarning,
    append_rows,
    failures_path,
    read_failures,
    read_results,
    record_failure,
    repair_results,
    results_path,
)
from .sweeps import KEEP_CHECKPOINTS, log_path, sweep, sweep_missing_seeds
from .tables import (
    LOWER_IS_BETTER,
    METRICS,
    SHORT_HASH,
    SweepResult,
    auilc,
    auilc_table,
    config_labels,
    metric_columns,
    metrics_for,
    plot_curves,
    report,
    summarize,
    to_markdown,
)
from .trial import NOT_KEPT, VALID_SCORE, incomplete_dir, prepare_incomplete_views, run_missing_trial, run_trial

__all__ = [
    "DEFAULT_SEEDS", "DIGEST_CACHE", "EXECUTORS", "KEEP_CHECKPOINTS", "KEY_COLUMNS", "LOG_COLUMN", "LOWER_IS_BETTER",
    "METRICS", "NOT_KEPT", "OPTIONS", "PROTOCOLS", "SHORT_HASH", "TAIL_COLUMNS", "VALID_SCORE", "VOLATILE_ARGS",
    "DamagedResultsWarning", "ExecutorSettings", "Failure", "Job", "Rates", "RayMissingError",
    "ReplacedResultsWarning", "SweepResult", "TrialSpec", "append_rows", "auilc", "auilc_table", "check_settings",
    "config_hash", "config_labels", "default_rates", "failures_path", "file_digest", "incomplete_dir", "log_path",
    "metric_columns", "metrics_for", "plan_trials", "plot_curves", "prepare_incomplete_views", "read_failures",
    "read_results", "record_failure", "repair_results", "report", "results_path", "run_jobs", "run_missing_trial",
    "run_trial", "summarize", "sweep", "sweep_missing_seeds", "to_markdown",
]
