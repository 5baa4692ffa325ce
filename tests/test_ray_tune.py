"""``python -m mmsa_emt tune``: a 2-trial search on a local Ray (2 CPUs) on tiny data, selected on the validation
split, the chosen weights tested once afterwards, and the search resumed from its folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmsa_emt.cli import main
from mmsa_emt.robustness.executors import ExecutorSettings
from mmsa_emt.tuning import base_args, evaluate_checkpoint, search_space, tune_model

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd(), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


def test_two_trial_search_selects_on_validation_and_tests_once(workspace, tmp_path, capsys):
    config = workspace("mosi", scale=0.03, tune=True)
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate_other": [1e-4, 3e-3], "post_fusion_dropout": [0.0]}))
    out = tmp_path / "search"
    argv = ["tune", "--dataset", "mosi", "--config", str(config), "--space", str(space), "--trials", "2", "--out",
            str(out), "--executor", "ray", "--set", "max_epochs=2", "early_stop=2", "--scheduler", "asha"]
    main(argv)
    printed = capsys.readouterr().out
    saved = json.loads((out / "tune_EMT-DLFR-mosi.json").read_text())
    assert saved["selected_on"] == "validation Loss (min)" and len(saved["trials"]) == 2
    scores = [t["valid Loss"] for t in saved["trials"]]
    assert saved["valid"] == min(scores)  # the lowest validation loss, whatever the test results
    chosen = next(t for t in saved["trials"] if t["valid Loss"] == saved["valid"])
    assert saved["best_config"] == {"learning_rate_other": chosen["learning_rate_other"], "post_fusion_dropout": 0.0}
    assert chosen["checkpoint"] == saved["checkpoint"] and Path(saved["checkpoint"]).is_file()
    # the test results are those of the chosen weights, computed after the search
    args = {**base_args("EMT-DLFR", "mosi", config, {"max_epochs": 2, "early_stop": 2}), **saved["best_config"]}
    again = evaluate_checkpoint(args, saved["checkpoint"], 1111, 0)
    assert saved["test"]["MAE"] == pytest.approx(again["MAE"], abs=1e-6)
    assert "VALIDATION split" in printed and "TEST results of the chosen configuration" in printed
    assert printed.index("chosen on validation") < printed.index("TEST results")

    tune_model("EMT-DLFR", "mosi", config, trials=2, out_dir=out, space_file=space, scheduler="asha",
               overrides={"max_epochs": 2, "early_stop": 2}, executor=ExecutorSettings(kind="ray"))
    assert "resuming the search" in capsys.readouterr().out
    assert len(list((out / "trials").glob("*.pth"))) == 2  # no trial ran again
    with pytest.raises(ValueError, match="holds a search with other settings"):
        tune_model("EMT-DLFR", "mosi", config, trials=3, out_dir=out, space_file=space, scheduler="asha",
                   overrides={"max_epochs": 2, "early_stop": 2}, executor=ExecutorSettings(kind="ray"))


def test_search_space_comes_from_debug_params_and_is_checked(workspace, tmp_path):
    config = workspace("mosi", scale=0.03, tune=True)
    space = search_space("EMT-DLFR", "mosi", config)
    assert space["fusion_layers"] == [1, 2, 3, 4] and "learning_rate_bert" in space
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"attn_dropout": [0.1, 1.5]}))
    with pytest.raises(ValueError, match="attn_dropout"):
        search_space("EMT-DLFR", "mosi", config, bad)
    with pytest.raises(ValueError, match="MMSA_run"):
        base_args("TFN", "mosi", config)
