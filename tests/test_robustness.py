"""Missing-rate sweeps: AUILC, resuming, outputs, and the rate effect on a planted signal."""

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsa_emt.cli import main
from mmsa_emt.robustness import (
    KEY_COLUMNS,
    TrialSpec,
    auilc,
    plan_trials,
    read_results,
    results_path,
    summarize,
    sweep,
)

FAST = {"max_epochs": 2, "early_stop": 1}


def test_auilc_is_the_trapezoid_over_the_rates_run():
    assert auilc([0.0, 0.5, 1.0], [1.0, 2.0, 4.0]) == pytest.approx(0.5 * 1.5 + 0.5 * 3.0)
    assert auilc([1.0, 0.0, 0.5], [4.0, 1.0, 2.0]) == pytest.approx(2.25)  # order of the rows does not matter
    assert auilc([0.0, 0.1, 0.5], [3.0, 3.0, 1.0]) == pytest.approx(0.1 * 3.0 + 0.4 * 2.0)


def test_plans_name_their_protocol():
    settings = [(0.0,) * 3, (0.5,) * 3]
    per_rate = plan_trials(["EMT-DLFR", "TFN"], "mosi", settings, [1, 2])
    assert len(per_rate) == 8 and {t.protocol for t in per_rate} == {"per-rate"}
    assert all(t.test_rates == (t.train_rates,) for t in per_rate)
    once = plan_trials(["EMT-DLFR"], "mosi", settings, [1, 2], protocol="train-once", train_rate=0.3)
    assert [t.protocol for t in once] == ["train-once@0.3"] * 2
    assert once[0].train_rates == (0.3, 0.3, 0.3) and once[0].test_rates == tuple(settings)
    with pytest.raises(ValueError, match="per-rate, train-once"):
        plan_trials(["TFN"], "mosi", settings, [1], protocol="leave-one-out")


def test_sweep_of_emt_dlfr_and_tfn_then_nothing_new(workspace, tmp_path, capsys):
    config = workspace("mosi", scale=0.03)
    out = tmp_path / "robustness"
    argv = ["robustness", "--model", "EMT-DLFR", "TFN", "--dataset", "mosi", "--config", str(config), "--rates",
            "0", "0.5", "1", "--seeds", "1", "2", "--out", str(out), "--set", "max_epochs=2", "early_stop=1"]
    main(argv)
    frame = read_results(results_path(out, "mosi"))
    assert len(frame) == 12 and set(frame.model) == {"EMT-DLFR", "TFN"}
    assert frame.groupby(["model", "rate_t"]).seed.nunique().eq(2).all()
    assert frame.config_hash.nunique() == 2 and frame[["MAE", "Corr", "Non0_acc_2"]].notna().all().all()
    assert frame.checkpoint.nunique() == 12  # no (rate, seed) overwrote another
    printed = capsys.readouterr().out
    assert "AUILC" in printed and "0-1 (3 rates)" in printed

    table = pd.read_csv(out / "auilc_mosi_per-rate.csv")
    means = summarize(frame, "mosi")
    for model in ("EMT-DLFR", "TFN"):
        curve = means[means.model == model].sort_values("rate_t")
        row = table[table.model == model].iloc[0]
        assert row["MAE"] == pytest.approx(np.trapezoid(curve.MAE, curve.rate_t))
        assert row["Acc-2 non0"] == pytest.approx(np.trapezoid(curve.Non0_acc_2, curve.rate_t))  # already in %
    assert (out / "auilc_mosi_per-rate.md").read_text().startswith("| model | protocol |")
    assert (out / "robustness_mosi_per-rate.png").stat().st_size > 20_000

    main(argv)  # the same command again
    assert "12 already in" in capsys.readouterr().out
    assert len(read_results(results_path(out, "mosi"))) == 12


def test_interrupted_sweep_resumes_from_the_next_trial(tmp_path, workspace):
    config = workspace("mosi", scale=0.03)
    calls: list[TrialSpec] = []

    def fake_trial(spec, config_file, **kwargs):
        if len(calls) == 1 and not getattr(fake_trial, "resumed", False):
            raise KeyboardInterrupt  # killed during the second trial
        calls.append(spec)
        return [{**dict(zip(KEY_COLUMNS, ["EMT-DLFR", "mosi", spec.protocol, *spec.train_rates, *rates, spec.seed,
                                          kwargs["digest"]])), "MAE": 1.0 - rates[0] / 2, "Corr": 0.5,
                 "checkpoint": "-", "seconds": 0.0, "finished_at": "-"} for rates in spec.test_rates]

    def run(resumed: bool):
        fake_trial.resumed = resumed
        from mmsa_emt import robustness

        digest = robustness.config_hash("EMT-DLFR", "mosi", config)
        return sweep("EMT-DLFR", "mosi", config, rates=[0.0, 1.0], seeds=[1, 2], out_dir=tmp_path / "out",
                     progress=False, echo=lambda _: None,
                     trial_fn=lambda spec, cfg, **kw: fake_trial(spec, cfg, digest=digest, **kw))

    with pytest.raises(KeyboardInterrupt):
        run(resumed=False)
    assert len(read_results(results_path(tmp_path / "out", "mosi"))) == 1
    result = run(resumed=True)
    assert [(c.train_rates[0], c.seed) for c in calls] == [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]
    assert result.trained == 3 and len(result.results) == 4


def test_planted_signal_is_lost_at_rate_one(workspace, tmp_path):
    config = workspace("mosi", scale=0.2, seed=1, signal_audio=3.0, signal_vision=3.0,
                       common={"max_epochs": 6, "early_stop": 6, "update_epochs": 1},
                       model={"learning_rate_other": 3e-3, "learning_rate_video": 1e-3, "attn_dropout": 0.0,
                              "ff_dropout": 0.0, "post_fusion_dropout": 0.0, "batch_size": 16})
    result = sweep("EMT-DLFR", "mosi", config, rates=[0.0, 1.0], seeds=[1], out_dir=tmp_path / "out",
                   progress=False, echo=lambda _: None)
    mae = result.summary.set_index("rate_t").MAE
    assert mae[1.0] > 1.3 * mae[0.0], mae.to_dict()


def test_train_once_and_per_modality_rates(workspace, tmp_path, monkeypatch):
    config = workspace("mosi", scale=0.03)
    reads, real_load = [], pickle.load

    def counting_load(file, *a, **k):
        reads.append(Path(getattr(file, "name", "")).suffix)
        return real_load(file, *a, **k)

    monkeypatch.setattr(pickle, "load", counting_load)
    result = sweep("EMT-DLFR", "mosi", config, modality_rates=[(0.0, 0.0, 0.0), (0.5, 0.0, 1.0)], seeds=[3],
                   protocol="train-once", train_rate=0.2, out_dir=tmp_path / "out", overrides=FAST,
                   progress=False, echo=lambda _: None)
    frame = result.results
    assert list(frame.protocol) == ["train-once@0.2"] * 2
    assert frame[["train_rate_t", "train_rate_a", "train_rate_v"]].eq(0.2).all().all()
    assert frame[["rate_t", "rate_a", "rate_v"]].values.tolist() == [[0.0, 0.0, 0.0], [0.5, 0.0, 1.0]]
    assert frame.checkpoint.nunique() == 1  # one model, tested at every setting
    assert reads.count(".pkl") == 2  # the feature file: once to train, once for both test settings
    assert (tmp_path / "out" / "robustness_mosi_train-once@0.2.png").is_file()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep("EMT-DLFR", "mosi", config, rates=[0.0, 1.5], seeds=[3], out_dir=tmp_path / "o2", progress=False)
