"""Robustness sweeps on Ray (a local Ray with 2 CPUs, started once for this module): the same rows as the local
executor, a driver killed and resumed, failing trials and lost workers, devices and threads per trial."""

from __future__ import annotations

import functools
import json
import os
import re
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from mmsa_emt import robustness
from mmsa_emt.robustness import KEY_COLUMNS, TrialSpec, config_hash, read_failures, read_results, results_path, sweep
from mmsa_emt.robustness.executors import ExecutorSettings

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')

ON_RAY = ExecutorSettings(kind="ray", cpus_per_trial=1, retries=1)
TUBE = {"rates": [0.0, 0.5], "seeds": [1, 2], "progress": False, "echo": lambda _: None}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module; its workers import this test module (for the trial functions below)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.getcwd()]),
                                       "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


def fake_trial(spec: TrialSpec, config_file, *, out_dir, overrides=None, calls: Path, fail: tuple = (),
               crash_once: tuple = (), **kwargs) -> list[dict]:
    """Trains nothing: MAE = 1 + rate + seed / 100. Notes each call (a file in ``calls``, also from a Ray worker),
    raises for the trials tagged in ``fail`` and kills its own process on the first attempt of ``crash_once``."""
    calls.mkdir(parents=True, exist_ok=True)
    (calls / f"{spec.tag}.{uuid.uuid4().hex}").write_text(json.dumps(
        {"device": kwargs.get("device"), "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
         "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}))
    if spec.tag in fail:
        raise RuntimeError(f"planted failure in {spec.tag}")
    if spec.tag in crash_once and len(list(calls.glob(f"{spec.tag}.*"))) == 1:
        os._exit(1)  # the worker process dies, as on an out-of-memory kill
    digest = config_hash(spec.model, spec.dataset, config_file, overrides,
                         digest_cache=Path(out_dir) / robustness.DIGEST_CACHE)
    return [{**dict(zip(KEY_COLUMNS, [spec.model, spec.dataset, spec.protocol, *spec.train_rates, *rates, spec.seed,
                                      digest])),
             "MAE": 1.0 + rates[0] + spec.seed / 100, "Corr": 0.5, "checkpoint": f"{spec.tag}.pth", "seconds": 0.1,
             "finished_at": "2026-01-01T00:00:00+00:00"} for rates in spec.test_rates]


def calls_of(folder: Path) -> list[str]:
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.glob("*")) if folder.is_dir() else []


def comparable(out: Path) -> pd.DataFrame:
    frame = read_results(results_path(out, "mosi"))
    return frame.drop(columns=["seconds", "finished_at", "log", "checkpoint"]).sort_values(KEY_COLUMNS).reset_index(
        drop=True)


def test_ray_sweep_writes_the_rows_of_the_local_sweep(workspace, tmp_path):
    config = workspace("mosi", scale=0.03)
    local = sweep("EMT-DLFR", "mosi", config, out_dir=tmp_path / "local", **TUBE,
                  trial_fn=functools.partial(fake_trial, calls=tmp_path / "calls-local"))
    on_ray = sweep("EMT-DLFR", "mosi", config, out_dir=tmp_path / "ray", executor=ON_RAY, **TUBE,
                   trial_fn=functools.partial(fake_trial, calls=tmp_path / "calls-ray"))
    assert local.trained == on_ray.trained == 4 and not on_ray.failed
    pd.testing.assert_frame_equal(comparable(tmp_path / "local"), comparable(tmp_path / "ray"))
    seen = [json.loads(p.read_text()) for p in (tmp_path / "calls-ray").iterdir()]
    assert {s["device"] for s in seen} == {"cpu"}  # no GPU share: the trial is put on the CPU, not on any GPU
    assert {s["threads"] for s in seen} == {1} and {s["omp"] for s in seen} == {"1"}  # its CPU share
    assert all(s["pid"] != os.getpid() for s in seen)
    logs = read_results(results_path(tmp_path / "ray", "mosi")).log
    assert logs.nunique() == 4 and all(Path(p).parent == tmp_path / "ray" / "logs" for p in logs)


def test_killed_driver_resumes_without_losing_or_repeating_a_trial(workspace, tmp_path, monkeypatch):
    config = workspace("mosi", scale=0.03)
    out, calls = tmp_path / "out", tmp_path / "calls"
    real_append, appended = robustness.results.append_rows, []

    def append_then_die(path, rows):
        real_append(path, rows)
        appended.append(rows[0]["seed"])
        if len(appended) == 2:
            raise KeyboardInterrupt  # the driver killed right after its second trial's rows were written

    monkeypatch.setattr(robustness.results, "append_rows", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        sweep("EMT-DLFR", "mosi", config, out_dir=out, executor=ON_RAY, **TUBE,
              trial_fn=functools.partial(fake_trial, calls=calls))
    written = set(read_results(results_path(out, "mosi")).apply(lambda r: f"{r.rate_t:g}-{r.seed}", axis=1))
    assert len(written) == 2
    monkeypatch.setattr(robustness.results, "append_rows", real_append)
    resumed = sweep("EMT-DLFR", "mosi", config, out_dir=out, executor=ON_RAY, **TUBE,
                    trial_fn=functools.partial(fake_trial, calls=tmp_path / "calls-resumed"))
    assert resumed.trained == 2
    tags = [re.search(r"-r([0-9.]+)-[0-9.]+-[0-9.]+-seed(\d+)$", name) for name in calls_of(tmp_path / "calls-resumed")]
    rerun = {f"{tag[1]}-{tag[2]}" for tag in tags}
    assert rerun.isdisjoint(written) and len(rerun) == 2  # only the two trials not written ran again
    frame = read_results(results_path(out, "mosi"))
    assert len(frame) == 4 and not frame.duplicated(KEY_COLUMNS).any()
    assert not results_path(out, "mosi").with_name("results_mosi.csv.replaced").exists()


def test_failing_trial_is_retried_then_recorded_and_a_lost_worker_retried(workspace, tmp_path):
    config = workspace("mosi", scale=0.03)
    out, calls = tmp_path / "out", tmp_path / "calls"
    bad, crashing = "EMT-DLFR-mosi-per-rate-r0.5-0.5-0.5-seed2", "EMT-DLFR-mosi-per-rate-r0-0-0-seed1"
    lines: list[str] = []
    result = sweep("EMT-DLFR", "mosi", config, out_dir=out, executor=ON_RAY, **{**TUBE, "echo": lines.append},
                   trial_fn=functools.partial(fake_trial, calls=calls, fail=(bad,), crash_once=(crashing,)))
    assert result.failed == [bad] and result.trained == 3
    assert calls_of(calls).count(bad) == 2 and calls_of(calls).count(crashing) == 2  # retries=1: two attempts
    frame = read_results(results_path(out, "mosi"))
    assert len(frame) == 3 and not ((frame.rate_t == 0.5) & (frame.seed == 2)).any()
    [failure] = read_failures(out / "failures_mosi.jsonl")
    assert failure["trial"] == bad and failure["attempts"] == 2 and "planted failure" in failure["error"]
    assert any("1 of 4 trials failed" in line and bad in line for line in lines)
    again = sweep("EMT-DLFR", "mosi", config, out_dir=out, executor=ON_RAY, **TUBE,
                  trial_fn=functools.partial(fake_trial, calls=tmp_path / "calls-2"))
    assert again.trained == 1 and calls_of(tmp_path / "calls-2") == [bad]  # a failed trial runs in the next sweep


def test_real_trials_on_ray_match_local_and_keep_the_best_checkpoint(workspace, tmp_path, monkeypatch):
    """TFN (fed the derived incomplete-view files) trained for real on Ray and locally; on Ray only the weights of
    the seed with the best validation loss stay per rate."""
    config = workspace("mosi", scale=0.03)
    settings = {**TUBE, "overrides": {"max_epochs": 1, "early_stop": 1}}
    sweep("TFN", "mosi", config, out_dir=tmp_path / "local", **settings)
    on_ray = sweep("TFN", "mosi", config, out_dir=tmp_path / "ray", executor=ON_RAY, keep_checkpoints="best",
                   **settings)
    assert on_ray.trained == 4 and not on_ray.failed
    local, remote = comparable(tmp_path / "local"), comparable(tmp_path / "ray")
    pd.testing.assert_frame_equal(local, remote, atol=1e-5, rtol=1e-4)
    kept = json.loads((tmp_path / "ray" / "checkpoints" / "kept.json").read_text())
    assert len(kept) == 2 and {v["KeyEval"] for v in kept.values()} == {"Loss"}
    assert sorted(p.name for p in (tmp_path / "ray" / "checkpoints").glob("*.pth")) == sorted(
        Path(v["checkpoint"]).name for v in kept.values())
    for log in read_results(results_path(tmp_path / "ray", "mosi")).log:
        assert "TFN" in Path(log).read_text() or Path(log).stat().st_size > 0
    incomplete = sorted(p.name for p in (tmp_path / "ray" / ".incomplete").iterdir())
    assert len([n for n in incomplete if "-missing" in n]) == 2 and not [n for n in incomplete if n.endswith(".tmp")]
