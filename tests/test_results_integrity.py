"""Nothing a run saved is lost or mixed up: one results CSV for every model, distinct checkpoints for concurrent
runs, the shared MMSA log told apart by process."""

import ast
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FEATURE_FILES, run_dirs
from easydict import EasyDict
from MMSA import MMSA_run
from MMSA.utils import MetricsTop

import mmsa_emt
from mmsa_emt.mmsa.inference import mmsa_test
from mmsa_emt.mmsa.models import CheckpointError
from mmsa_emt.mmsa.results import append_results
from mmsa_emt.mmsa.trainer import _checkpoint_path

SWEEP_MODELS = ["tfn", "lmf", "mult", "misa", "self_mm", "mmim", "tfr_net"]  # MMSA's models of the sweeps


def _metric_names(dataset: str) -> list[str]:
    rng = np.random.default_rng(0)
    preds, labels = rng.normal(size=(20, 1)), rng.normal(size=(20, 1))
    return list(MetricsTop("regression").getMetics(dataset)(torch.tensor(preds), torch.tensor(labels)))


def _row(model: str, columns: list[str], seed: int) -> pd.DataFrame:
    return pd.DataFrame([[model, *[(float(seed + i), 0.5) for i in range(len(columns))]]],
                        columns=["Model", *columns], dtype=object)


def test_rows_of_every_model_are_kept_with_the_union_of_columns(tmp_path):
    csv = tmp_path / "normal" / "mosi.csv"
    csv.parent.mkdir()
    # a row an older, unmended MMSA run wrote (numpy 2 text) is kept as written
    csv.write_text("Model,MAE,Corr\nlf_dnn,\"(np.float64(90.1), np.float64(1.2))\",\"(60.0, 2.0)\"\n")
    metrics = _metric_names("mosi")
    columns = {m: [*metrics, "Loss"] for m in SWEEP_MODELS}  # what MMSA's trainers return (do_test)
    columns["emt-dlfr"] = [*metrics, "Loss", "Loss(pred_m)"]
    columns["no-loss"] = metrics[::-1]  # another order and one column fewer
    order = ["emt-dlfr", *SWEEP_MODELS[:3], "no-loss", *SWEEP_MODELS[3:], "emt-dlfr"]
    for seed, model in enumerate(order):
        append_results(csv, _row(model, columns[model], seed))
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert list(frame["Model"]) == ["lf_dnn", *order]
    assert list(frame.columns) == ["Model", "MAE", "Corr", *[c for c in columns["emt-dlfr"] if c not in
                                                             ("MAE", "Corr")]]
    assert frame.loc[0, "MAE"] == "(np.float64(90.1), np.float64(1.2))" and frame.loc[0, "Loss"] == ""
    for i, model in enumerate(order, start=1):
        for j, column in enumerate(columns[model]):
            assert frame.loc[i, column] == str((float(i - 1 + j), 0.5)), (model, column)
        assert all(frame.loc[i, c] == "" for c in frame.columns[1:] if c not in columns[model])


def test_unreadable_results_csv_is_named_and_left_alone(tmp_path):
    csv = tmp_path / "mosi.csv"
    csv.write_bytes(b"Model,MAE\n\xff\xfe,\"(1.0, 2.0)\n")
    before = csv.read_bytes()
    with pytest.raises(ValueError, match=r"(?s)mosi\.csv, which is not a readable CSV.*The new results:\n.*tfn"):
        append_results(csv, _row("tfn", ["MAE"], 0))
    assert csv.read_bytes() == before


def _append_after(barrier, csv: str, k: int) -> None:
    barrier.wait()
    for j in range(5):
        append_results(csv, _row(f"m{k}-{j}", ["MAE", f"only{k}"], k))


def test_concurrent_appends_lose_no_row(tmp_path):
    csv = str(tmp_path / "mosi.csv")
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    workers = [context.Process(target=_append_after, args=(barrier, csv, k)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert [w.exitcode for w in workers] == [0] * 4
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert sorted(frame["Model"]) == sorted(f"m{k}-{j}" for k in range(4) for j in range(5))
    assert set(frame.columns) == {"Model", "MAE", "only0", "only1", "only2", "only3"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("order", [("TFN", "EMT-DLFR"), ("EMT-DLFR", "TFN")])
def test_mmsa_run_of_two_models_into_one_results_folder(workspace, tmp_path, order):
    config = workspace("mosi", scale=0.03)
    csv = tmp_path / "results" / "normal" / "mosi.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("Model,MAE\nolder,\"(1.0, 2.0)\"\n")  # a row of an older run with other columns
    for model in order:
        MMSA_run(model, "mosi", config_file=str(config), config={"early_stop": 1}, seeds=[1], gpu_ids=[],
                 num_workers=0, **run_dirs(tmp_path))
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert list(frame["Model"]) == ["older", *[m.lower() for m in order]]
    assert {"MAE", "Corr", "Loss", "Loss(pred_m)", "Non0_acc_2"} <= set(frame.columns)
    rows = frame.set_index("Model")
    assert rows.loc["older", "MAE"] == "(1.0, 2.0)" and rows.loc["older", "Corr"] == ""
    assert rows.loc["tfn", "Loss(pred_m)"] == ""
    for model in ("tfn", "emt-dlfr"):
        mean, std = ast.literal_eval(rows.loc[model, "MAE"])
        assert isinstance(mean, float) and np.isfinite(mean) and isinstance(std, float)
    assert rows.loc["emt-dlfr", "Loss(pred_m)"].startswith("(")


def test_checkpoint_names_are_reserved_at_once(tmp_path):
    torch.manual_seed(9)
    args = EasyDict(model_save_path=tmp_path / "emt-dlfr-mosi.pth")
    first, second = _checkpoint_path(args), _checkpoint_path(args)
    assert (first.name, second.name) == ("emt-dlfr-mosi-seed9.pth", "emt-dlfr-mosi-seed9-1.pth")
    assert first.is_file() and first.stat().st_size == 0  # an empty placeholder until the weights replace it


def _reserve_after(barrier, folder: str, queue) -> None:
    torch.manual_seed(9)
    barrier.wait()
    queue.put(_checkpoint_path(EasyDict(model_save_path=Path(folder) / "emt-dlfr-mosi.pth")).name)


def test_concurrent_runs_with_one_seed_get_distinct_checkpoints(tmp_path):
    context = multiprocessing.get_context("fork")
    barrier, queue = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_reserve_after, args=(barrier, str(tmp_path), queue)) for _ in range(6)]
    for w in workers:
        w.start()
    names = [queue.get(timeout=30) for _ in workers]
    for w in workers:
        w.join(30)
    assert sorted(names) == sorted(["emt-dlfr-mosi-seed9.pth", *[f"emt-dlfr-mosi-seed9-{n}.pth" for n in range(1, 6)]])


def test_placeholder_of_a_killed_run_is_not_reused_and_not_loaded(workspace, tmp_path):
    config = workspace("mosi", scale=0.03)
    placeholder = tmp_path / "models" / "emt-dlfr-mosi-seed3.pth"
    placeholder.parent.mkdir()
    placeholder.touch()  # what a run killed before its first checkpoint leaves
    MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[3], gpu_ids=[], num_workers=0,
             **run_dirs(tmp_path))
    assert placeholder.stat().st_size == 0
    assert (tmp_path / "models" / "emt-dlfr-mosi-seed3-1.pth").stat().st_size > 0
    with open(tmp_path / "dataset" / FEATURE_FILES["mosi"], "rb") as f:
        test = pickle.load(f)["test"]
    sample = tmp_path / "sample.pkl"
    sample.write_bytes(pickle.dumps({k: test[k][0] for k in ("text_bert", "audio", "vision", "audio_lengths",
                                                             "vision_lengths")}))
    with pytest.raises(CheckpointError, match=r"emt-dlfr-mosi-seed3\.pth is empty"):
        mmsa_test(mmsa_emt.load_config("EMT-DLFR", "mosi", config), str(placeholder), str(sample), gpu_id=-1)


def test_failed_run_frees_its_checkpoint_name_and_log_lines_carry_the_process(workspace, tmp_path, monkeypatch):
    import mmsa_emt.mmsa.trainer as mmsa_trainer

    def failing_fit(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(mmsa_trainer, "fit", failing_fit)
    config = workspace("mosi", scale=0.03)
    with pytest.raises(RuntimeError, match="planted failure"):
        MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[4], gpu_ids=[], num_workers=0,
                 **run_dirs(tmp_path))
    assert list((tmp_path / "models").iterdir()) == []
    log = (tmp_path / "logs" / "emt-dlfr-mosi.log").read_text()
    assert f"[pid {os.getpid()}]" in log.splitlines()[0]
