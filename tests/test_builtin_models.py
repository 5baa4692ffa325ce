"""MMSA's built-in models the robustness sweeps compare with: offline, on the CPU, with a small local encoder."""

import pytest
from conftest import run_dirs
from MMSA import MMSA_run
from test_mmsa_run import read_results

BASELINES = ["TFN", "LMF", "MulT", "MISA", "Self_MM", "MMIM", "TFR_Net"]


@pytest.mark.parametrize("model", BASELINES)
def test_builtin_model_runs_offline_with_a_local_encoder(workspace, tmp_path, tiny_bert, model):
    config = workspace("mosi", scale=0.03)
    overrides = {"early_stop": 1, "pretrained": str(tiny_bert), "num_temporal_head": 2,  # TFR_Net: (16, 12, 10)
                 "missing_rate": [0.3, 0.3, 0.3], "missing_seed": [111, 1111, 11111]}
    MMSA_run(model, "mosi", config_file=str(config), config=overrides, seeds=[1], gpu_ids=[], num_workers=0,
             **run_dirs(tmp_path))
    frame = read_results(tmp_path / "results" / "normal" / "mosi.csv")
    assert list(frame["Model"]) == [model.lower()]
    mae, _ = frame["MAE"][0]
    assert 0 < mae < 1000  # MAE x 100, finite


def test_tfr_net_head_count_that_cannot_divide_the_lengths_is_named(workspace, tmp_path, tiny_bert):
    config = workspace("mosi", scale=0.03)
    with pytest.raises(ValueError, match=r"num_temporal_head=25.*e\.g\. 2"):
        MMSA_run("TFR_Net", "mosi", config_file=str(config), config={"pretrained": str(tiny_bert)}, seeds=[1],
                 gpu_ids=[], num_workers=0, **run_dirs(tmp_path))


@pytest.mark.parametrize("model", BASELINES)
def test_builtin_model_in_a_sweep_gets_the_incomplete_view(workspace, tmp_path, tiny_bert, model):
    from mmsa_emt.robustness import sweep

    config = workspace("mosi", scale=0.03)
    result = sweep(model, "mosi", config, rates=[0.5], seeds=[1], out_dir=tmp_path / "out", progress=False,
                   overrides={"early_stop": 1, "pretrained": str(tiny_bert), "num_temporal_head": 2},
                   echo=lambda _: None)
    assert list(result.results.model) == [model] and result.results.MAE.notna().all()
    derived = list((tmp_path / "out" / ".incomplete").glob("*.pkl"))
    assert len(derived) == (0 if model == "TFR_Net" else 1)  # TFR_Net reads MMSA's incomplete view itself
