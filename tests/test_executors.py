"""Executor settings and the local executor (no Ray needed): failures recorded, threads per trial, work done once
before the trials, checkpoints kept or not, and the message when Ray is asked for but not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mmsa_emt import robustness
from mmsa_emt.cli import main
from mmsa_emt.robustness import KEY_COLUMNS, config_hash, read_failures, read_results, results_path, sweep
from mmsa_emt.robustness.executors import ExecutorSettings, RayMissingError

QUIET = {"progress": False, "echo": lambda _: None}


def rows_for(spec, config_file, out_dir, overrides) -> list[dict]:
    digest = config_hash(spec.model, spec.dataset, config_file, overrides,
                         digest_cache=Path(out_dir) / robustness.DIGEST_CACHE)
    return [{**dict(zip(KEY_COLUMNS, [spec.model, spec.dataset, spec.protocol, *spec.train_rates, *rates, spec.seed,
                                      digest])),
             "MAE": 1.0, "Corr": 0.5, "checkpoint": "-", "seconds": 0.1, "finished_at": "-"}
            for rates in spec.test_rates]


def test_local_failing_trial_is_retried_recorded_and_the_others_go_on(workspace, tmp_path):
    config = workspace("mosi", scale=0.03)
    attempts: list[str] = []

    def trial(spec, config_file, *, out_dir, overrides=None, **_):
        attempts.append(spec.tag)
        if spec.seed == 1 and spec.train_rates[0] == 0.0:
            raise FloatingPointError("the training loss became nan in epoch 3")
        return rows_for(spec, config_file, out_dir, overrides)

    lines: list[str] = []
    result = sweep("EMT-DLFR", "mosi", config, rates=[0.0, 1.0], seeds=[1, 2], out_dir=tmp_path, trial_fn=trial,
                   progress=False, echo=lines.append, executor=ExecutorSettings(retries=2))
    bad = "EMT-DLFR-mosi-per-rate-r0-0-0-seed1"
    assert attempts.count(bad) == 3 and len(attempts) == 6
    assert result.failed == [bad] and result.trained == 3 and len(result.results) == 3
    [failure] = read_failures(tmp_path / "failures_mosi.jsonl")
    assert failure["error"] == "FloatingPointError: the training loss became nan in epoch 3"
    assert failure["attempts"] == 3 and "Traceback" in failure["traceback"] and failure["seed"] == 1
    assert any("1 of 4 trials failed" in line for line in lines)
    assert any(line.startswith("NOTE: 1 failed trial is missing") for line in lines)


def test_every_trial_failing_is_an_error_naming_the_failures_file(workspace, tmp_path):
    config = workspace("mosi", scale=0.03)

    def trial(spec, *args, **kwargs):
        raise ValueError("broken")

    with pytest.raises(RuntimeError, match="every trial of the sweep failed; see .*failures_mosi.jsonl"):
        sweep("EMT-DLFR", "mosi", config, rates=[0.0], seeds=[1], out_dir=tmp_path, trial_fn=trial, **QUIET,
              executor=ExecutorSettings(retries=0))


def test_cpus_per_trial_sets_the_trials_threads(workspace, tmp_path, monkeypatch):
    config = workspace("mosi", scale=0.03)
    seen = []

    def trial(spec, config_file, *, out_dir, overrides=None, **_):
        import os

        seen.append((torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"]))
        return rows_for(spec, config_file, out_dir, overrides)

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    try:
        sweep("EMT-DLFR", "mosi", config, rates=[0.0], seeds=[1], out_dir=tmp_path, trial_fn=trial, **QUIET,
              executor=ExecutorSettings(cpus_per_trial=2))
    finally:
        torch.set_num_threads(before)
    assert seen == [(2, "2", "2")]


def test_incomplete_views_are_written_before_the_first_trial(workspace, tmp_path, monkeypatch):
    """TFN is fed derived feature files: all of the sweep's are in its shared folder when the first trial starts
    (trials on several workers then only read them), and each row names its own log file."""
    config = workspace("mosi", scale=0.03)
    ready_at_start = []
    real = robustness.trial.run_missing_trial

    def noting(args, *, cache_dir, **kwargs):
        ready_at_start.append(sorted(p.name for p in Path(cache_dir).glob("*-missing*.pkl")))
        return real(args, cache_dir=cache_dir, **kwargs)

    monkeypatch.setattr(robustness.trial, "run_missing_trial", noting)
    sweep("TFN", "mosi", config, rates=[0.0, 1.0], seeds=[1], out_dir=tmp_path, keep_checkpoints="none",
          overrides={"max_epochs": 1, "early_stop": 1}, **QUIET)
    assert len(ready_at_start) == 2 and len(ready_at_start[0]) == 2 and ready_at_start[0] == ready_at_start[1]
    frame = read_results(results_path(tmp_path, "mosi"))
    assert frame.checkpoint.eq(robustness.NOT_KEPT).all() and not list((tmp_path / "checkpoints").glob("*.pth"))
    for log in frame.log:
        assert "TFN" in Path(log).read_text()


def test_keep_best_keeps_the_seed_with_the_best_validation_score(workspace, tmp_path):
    config = workspace("mosi", scale=0.03)
    valid = {1: 0.9, 2: 0.4, 3: 0.7}  # validation loss per seed: seed 2 is the best, whatever the test scores

    def trial(spec, config_file, *, out_dir, overrides=None, keep_checkpoint="all", **_):
        path = Path(out_dir) / "checkpoints" / f"{spec.tag}.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        rows = rows_for(spec, config_file, out_dir, overrides)
        for row in rows:
            row.update(checkpoint=str(path), MAE=valid[spec.seed])
            row[robustness.VALID_SCORE] = {"key": "Loss", "value": valid[spec.seed], "minimize": True}
        assert keep_checkpoint == "best"
        return rows

    sweep("EMT-DLFR", "mosi", config, rates=[0.0], seeds=[1, 2, 3], out_dir=tmp_path, trial_fn=trial, **QUIET,
          keep_checkpoints="best")
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.pth")] == ["EMT-DLFR-mosi-per-rate-r0-0-0-seed2.pth"]
    [entry] = json.loads((tmp_path / "checkpoints" / "kept.json").read_text()).values()
    assert entry["valid"] == 0.4 and entry["trial"].endswith("seed2")
    assert "_valid_score" not in read_results(results_path(tmp_path, "mosi"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--executor", "ray"], '--executor ray needs Ray, which is not installed here: pip install -e ".[ray]"'),
    (["--gpus-per-trial", "1"], "--gpus-per-trial is a setting of --executor ray"),
    (["--retries", "-1"], "--retries/retries=-1 must be a whole number >= 0"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial/cpus_per_trial=0.0 must be a number > 0"),
])
def test_executor_options_are_checked_before_anything_runs(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SystemExit):
        main(["robustness", "--dataset", "mosi", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_sweep_without_ray_names_the_extra(workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayMissingError, match=r'pip install -e "\.\[ray\]"'):
        sweep("EMT-DLFR", "mosi", workspace("mosi"), rates=[0.0], seeds=[1], out_dir=tmp_path, executor="ray", **QUIET)
    import mmsa_emt.robustness  # noqa: F401  the package itself imports without Ray
