"""The command line: train (MMSA_run), test (saved weights on a split), list, --help, and --set checked first."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import REPO, run_dirs

from mmsa_emt.cli import main

SUBCOMMANDS = ("train", "test", "list", "demo", "prepare-avec2019", "params", "robustness", "normalize-features")


def _dirs(tmp_path) -> list[str]:
    return [arg for key, path in run_dirs(tmp_path).items() for arg in (f"--{key.replace('_', '-')}", str(path))]


def _train(config, tmp_path, *extra: str) -> None:
    main(["train", "-m", "emt-dlfr", "-d", "mosi", "-c", str(config), "-s", "3", "--set", "max_epochs=2",
          *_dirs(tmp_path), *extra])


def test_help_lists_every_subcommand_with_one_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", text, re.MULTILINE), name  # the name, then its line


def test_python_dash_m_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "mmsa_emt", "--help"], cwd=REPO, capture_output=True, text=True,
                          check=True)
    assert all(name in done.stdout for name in SUBCOMMANDS)


def test_list_shows_models_datasets_and_keys_with_defaults(workspace, capsys):
    main(["list", "-c", str(workspace("mosi"))])
    text = capsys.readouterr().out
    assert "EMT-DLFR" in text and "TFN" in text and "Self_MM" in text
    assert re.search(r"datasets of .*: mosi, mosei, sims", text)
    assert re.search(r"^\s+ff_expansion\s+4$", text, re.MULTILINE)
    assert re.search(r"^\s+attn_act_fn\s+\"tanh\"$", text, re.MULTILINE)
    assert re.search(r"^\s+d_model\s+required$", text, re.MULTILINE)
    assert re.search(r"^\s+missing_seed\s+\[111, 1111, 11111\]$", text, re.MULTILINE)


@pytest.mark.parametrize(("model", "key", "closest"), [("emt-dlfr", "learning_rate_othr", "learning_rate_other"),
                                                       ("tfn", "learning_rat", "learning_rate")])
def test_bad_set_key_fails_before_training_naming_the_closest(workspace, tmp_path, capsys, model, key, closest):
    config = workspace("mosi")
    with pytest.raises(SystemExit) as done:
        main(["train", "-m", model, "-d", "mosi", "-c", str(config), "--set", f"{key}=1e-4", *_dirs(tmp_path)])
    assert done.value.code == 2
    assert f"'{key}' (did you mean '{closest}'?)" in capsys.readouterr().err
    assert not any(path.exists() for path in run_dirs(tmp_path).values())  # nothing run, nothing written


def test_bad_set_value_fails_before_training(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(workspace("mosi"), tmp_path, "--set", "modalities=[\"text\",\"smell\"]")
    assert "config key 'modalities'" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_train_then_test_gives_the_runs_test_metrics(workspace, tmp_path, capsys):
    config = workspace("mosi")
    _train(config, tmp_path, "--set", "learning_rate_other=1e-4", "modalities=[\"text\",\"vision\"]")
    row = pd.read_csv(tmp_path / "results" / "normal" / "mosi.csv").iloc[0]
    assert row["Model"] == "emt-dlfr"
    weights = tmp_path / "models" / "emt-dlfr-mosi-seed3.pth"
    saved = torch.load(weights, weights_only=True)
    assert saved["config"]["modalities"] == ["text", "vision"]  # --set values read as JSON, stored with the weights
    assert saved["settings"]["learning_rate_other"] == 1e-4

    out = tmp_path / "tested.csv"
    capsys.readouterr()
    main(["test", "--checkpoint", str(weights), "-d", "mosi", "-c", str(config), "--out", str(out)])
    assert "a row added to" in capsys.readouterr().out
    tested = pd.read_csv(out)
    assert len(tested) == 1 and tested["split"][0] == "test"
    assert json.loads(tested["missing_rate"][0]) == [0.5, 0.5, 0.5]  # the run's own rate (the config's)
    metrics = [c for c in row.index if c != "Model"]
    assert {"MAE", "Corr", "Non0_acc_2", "Loss"} <= set(metrics)
    for metric in [m for m in metrics if not m.startswith("Loss")]:  # per-sample metrics; the losses are means
        mean, std = ast.literal_eval(row[metric])  # of batch means, and MMSA's test loader shuffles the batches
        assert std == 0.0
        # MMSA rounds each metric to 4 places; batches of other samples move a prediction by float rounding only
        assert round(float(tested[metric][0]) * 100, 2) == pytest.approx(mean, abs=0.0101), metric
    assert float(tested["Loss"][0]) == pytest.approx(ast.literal_eval(row["Loss"])[0] / 100, rel=0.3)

    main(["test", "--checkpoint", str(weights), "-d", "mosi", "--split", "valid", "--missing-rate", "0",
          "-c", str(config), "--out", str(out)])
    again = pd.read_csv(out)
    assert len(again) == 2  # appended, the first row kept
    assert again.iloc[0].equals(tested.iloc[0])
    assert again["split"][1] == "valid" and json.loads(again["missing_rate"][1]) == [0.0, 0.0, 0.0]


def test_test_on_weights_only_needs_a_config(workspace, tmp_path, capsys):
    config = workspace("mosi")
    _train(config, tmp_path)
    weights = tmp_path / "models" / "emt-dlfr-mosi-seed3.pth"
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(weights)["state_dict"], plain)  # as MMSA saves its models: weights only
    with pytest.raises(SystemExit):
        main(["test", "--checkpoint", str(plain), "-d", "mosi", "--out", str(tmp_path / "t.csv")])
    assert "holds weights only, no model config: pass -c/--config CONFIG" in capsys.readouterr().err
    main(["test", "--checkpoint", str(plain), "-d", "mosi", "-c", str(config), "--out", str(tmp_path / "t.csv")])
    main(["test", "--checkpoint", str(weights), "-d", "mosi", "-c", str(config), "--out", str(tmp_path / "t.csv")])
    rows = pd.read_csv(tmp_path / "t.csv")
    assert rows.loc[0, "MAE"] == rows.loc[1, "MAE"]  # the same weights, built from the config or the checkpoint


def test_demo_config_not_found_advises_what_demo_accepts(tmp_path):
    from mmsa_emt.demo import DemoSettings, write_demo_config

    with pytest.raises(FileNotFoundError) as caught:
        write_demo_config(DemoSettings(out=tmp_path, config_file=tmp_path / "absent.json"), "encoder")
    message = str(caught.value)
    assert "absent.json not found" in message and "DemoSettings.config_file" in message
    assert "--config" not in message  # demo has no such option


def test_one_command_serves_an_mmsa_baseline(workspace, tmp_path):
    config = workspace("mosi")
    main(["train", "-m", "tfn", "-d", "mosi", "-c", str(config), "-s", "1", "--set", "early_stop=1",
          *_dirs(tmp_path)])
    row = pd.read_csv(tmp_path / "results" / "normal" / "mosi.csv").iloc[0]
    assert row["Model"] == "tfn"
    out = tmp_path / "t.csv"
    main(["test", "--checkpoint", str(tmp_path / "models" / "tfn-mosi.pth"), "-m", "tfn", "-d", "mosi",
          "-c", str(config), "--out", str(out)])
    tested = pd.read_csv(out, keep_default_na=False).iloc[0]
    assert tested["Model"] == "TFN" and tested["missing_rate"] == "null"  # the feature file as it is
    for metric in ("MAE", "Corr", "Non0_acc_2"):
        assert round(float(tested[metric]) * 100, 2) == pytest.approx(ast.literal_eval(row[metric])[0], abs=0.0101)
