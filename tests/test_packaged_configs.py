"""Configs as package data: only mmsa-emt's entries ship, merged at load time into the installed MMSA's config; the
repository's config/ files are generated from them; a wheel works from any folder."""

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

import mmsa_emt.configs as configs
from mmsa_emt.cli import main as cli_main
from mmsa_emt.mmsa.config import _config_regression, _config_tune, load_config

REGENERATE = "python -m mmsa_emt write-configs --out config --overwrite"
PARAM_TOTALS = {"mosi": "111,805,019", "mosei": "111,597,823", "sims": "103,793,240"}  # README's table


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test writes the merged config into its own cache folder."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(configs.CACHE_ENV, str(folder))
    return folder


@pytest.mark.parametrize("name", ["config_regression.json", "config_tune.json"])
def test_repository_configs_are_what_the_package_generates(name):
    expected = configs.repository_configs()[name]
    assert (REPO / "config" / name).read_text(encoding="utf-8") == expected, (
        f"config/{name} is out of sync with mmsa_emt/configs/ and MMSA's config: regenerate it with '{REGENERATE}'")


@pytest.mark.parametrize("tune", [False, True])
def test_the_package_holds_only_our_entries_and_the_merge_keeps_every_mmsa_value(tune):
    ours = configs.ours(tune)
    assert set(ours) == {"datasetCommonParams", "emt-dlfr"}
    assert set(ours["datasetCommonParams"]) == {"avec2019"}
    assert ("debugParams" in ours["emt-dlfr"]) is tune
    theirs = json.loads(configs.mmsa_config_file(tune).read_text(encoding="utf-8"))
    merged = configs.merged_config(tune)
    assert list(merged)[:2] == ["datasetCommonParams", "emt-dlfr"]
    assert {k: v for k, v in merged.items() if k not in ours} == {k: v for k, v in theirs.items() if k not in ours}
    assert merged["datasetCommonParams"] == {**theirs["datasetCommonParams"], **ours["datasetCommonParams"]}
    assert merged["emt-dlfr"] == ours["emt-dlfr"]


@pytest.mark.parametrize("dataset", ["mosi", "sims", "avec2019"])
def test_load_config_without_a_file_reads_the_merged_config(dataset, cache):
    volatile = ("featurePath", "config_file", "feature_hint")
    for tune in (False, True):
        args = load_config("EMT-DLFR", dataset, tune=tune)
        kind = "tune" if tune else "regression"
        reference = load_config("EMT-DLFR", dataset, REPO / "config" / f"config_{kind}.json", tune=tune)
        if tune:  # a trial draws from the search space: compare what is not drawn
            volatile += tuple(reference["d_paras"])
        assert {k: v for k, v in args.items() if k not in volatile} == \
               {k: v for k, v in reference.items() if k not in volatile}
        assert Path(args["config_file"]).parent == cache
        root = configs.merged_config(tune)["datasetCommonParams"]["dataset_root_dir"]
        assert args["featurePath"].startswith(root)  # MMSA's data folder, not one relative to the cache
        assert "write-configs" in args["feature_hint"]


def test_mmsa_run_readers_take_mmsa_default_as_the_merged_config(tmp_path, cache):
    """MMSA_run passes its own config's path when given none: our readers read the merged config then, and a
    user's file as it is."""
    args = _config_regression("emt-dlfr", "mosi", str(configs.mmsa_config_file()))
    assert args["model_name"] == "emt-dlfr" and Path(args["config_file"]).parent == cache
    args = _config_tune("emt-dlfr", "mosi", str(configs.mmsa_config_file(tune=True)))
    assert Path(args["config_file"]).parent == cache and "d_paras" in args
    tfn = _config_regression("tfn", "mosi", str(configs.mmsa_config_file()))
    assert {k: v for k, v in tfn.items() if k not in ("config_file", "feature_hint")} == \
           {k: v for k, v in load_config("tfn", "mosi", configs.mmsa_config_file()).items()
            if k not in ("config_file", "feature_hint")}
    mine = tmp_path / "mine.json"
    raw = json.loads((REPO / "config" / "config_regression.json").read_text(encoding="utf-8"))
    raw["emt-dlfr"]["datasetParams"]["mosi"]["d_model"] = 64
    mine.write_text(json.dumps(raw), encoding="utf-8")
    args = _config_regression("emt-dlfr", "mosi", str(mine))
    assert args["d_model"] == 64 and args["config_file"] == str(mine)


def test_the_cached_file_is_named_by_its_content_and_repaired_if_changed(cache):
    path = configs.merged_config_file()
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == configs.merged_config() and path.parent == cache
    assert configs.merged_config_file() == path and path.read_text(encoding="utf-8") == text
    assert configs.merged_config_file(tune=True) != path
    path.write_text(text.replace('"d_model": 128', '"d_model": 8', 1), encoding="utf-8")  # edited by hand
    assert configs.merged_config_file() == path and path.read_text(encoding="utf-8") == text
    assert sorted(p.name for p in cache.iterdir()) == sorted(  # no temporary file left behind
        [path.name, configs.merged_config_file(tune=True).name])


def test_an_unwritable_cache_names_the_setting(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv(configs.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(OSError, match=configs.CACHE_ENV):
        configs.merged_config_file()


def _mmsa_copy(tmp_path: Path, change) -> Path:
    raw = json.loads(configs.mmsa_config_file().read_text(encoding="utf-8"))
    change(raw)
    path = tmp_path / "mmsa_config_regression.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize("change,message", [
    (lambda raw: raw.pop("datasetCommonParams"), "no datasetCommonParams.dataset_root_dir"),
    (lambda raw: raw["datasetCommonParams"].pop("mosei"), "no datasetCommonParams entry for mosei"),
    (lambda raw: raw.update({"emt-dlfr": raw["tfn"]}), "already has model 'emt-dlfr'"),
    (lambda raw: raw["datasetCommonParams"].update(avec2019={}), "already has avec2019"),
])
def test_an_mmsa_config_that_cannot_take_ours_is_refused_by_name(tmp_path, change, message):
    path = _mmsa_copy(tmp_path, change)
    with pytest.raises(configs.ConfigMergeError, match=message) as error:
        configs.merged_config(mmsa_file=path)
    assert str(path) in str(error.value)


def test_write_configs_writes_complete_files_and_keeps_a_users_edits(tmp_path, capsys):
    out = tmp_path / "config"
    cli_main(["write-configs", "--out", str(out)])
    assert "written" in capsys.readouterr().out
    for name in ("config_regression.json", "config_tune.json"):
        assert (out / name).read_text(encoding="utf-8") == (REPO / "config" / name).read_text(encoding="utf-8")
    args = load_config("EMT-DLFR", "mosi", out / "config_regression.json")
    assert args["featurePath"] == str(tmp_path / "dataset" / "MOSI" / "Processed" / "unaligned_50.pkl")
    cli_main(["write-configs", "--out", str(out)])
    assert capsys.readouterr().out.count("unchanged") == 2
    edited = (out / "config_tune.json").read_text(encoding="utf-8").replace('"d_model": 128', '"d_model": 64', 1)
    (out / "config_tune.json").write_text(edited, encoding="utf-8")
    with pytest.raises(SystemExit, match="config_tune.json exist.*--overwrite"):
        cli_main(["write-configs", "--out", str(out)])
    assert (out / "config_tune.json").read_text(encoding="utf-8") == edited
    cli_main(["write-configs", "--out", str(out), "--overwrite", "--dataset-root", "/data/mmsa"])
    assert json.loads((out / "config_tune.json").read_text(encoding="utf-8"))["datasetCommonParams"][
        "dataset_root_dir"] == "/data/mmsa"


def test_the_demo_config_comes_from_the_package(tmp_path):
    from mmsa_emt.demo import DemoSettings, write_demo_config

    path = write_demo_config(DemoSettings(out=tmp_path), "/enc")
    demo = json.loads(path.read_text(encoding="utf-8"))
    shipped = json.loads((REPO / "config" / "config_regression.json").read_text(encoding="utf-8"))
    assert demo["tfn"] == shipped["tfn"] and demo["datasetCommonParams"]["dataset_root_dir"] == "dataset"
    assert demo["emt-dlfr"]["datasetParams"]["mosi"]["pretrained"] == "/enc"
    with pytest.raises(FileNotFoundError, match="demo config .*nothing.json not found"):
        write_demo_config(DemoSettings(out=tmp_path, config_file=tmp_path / "nothing.json"), "/enc")


def _repository_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the wheel is built from the git checkout's files: {error}")
    return [name for name in listed if name and (REPO / name).is_file()]


@pytest.mark.wheel
def test_the_wheel_holds_the_package_data_and_runs_from_an_empty_folder(tmp_path):
    """Build the wheel from a copy of the checkout, check what it holds, install it into a fresh environment that
    sees the system's packages, and run ``python -m mmsa_emt params`` from an empty folder."""
    source = tmp_path / "source"
    for name in _repository_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dist)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("mmsa_emt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"mmsa_emt/configs/__init__.py", "mmsa_emt/configs/config_regression.json",
            "mmsa_emt/configs/config_tune.json", "mmsa_emt/__main__.py"} <= set(names)
    top = {name.split("/")[0] for name in names}
    assert top == {"mmsa_emt", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    assert not [n for n in names if n.endswith((".pkl", ".pth", ".csv")) or "__pycache__" in n]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: filelock" in metadata and "scikit-learn" not in metadata

    env_dir = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    environ = {**os.environ, configs.CACHE_ENV: str(tmp_path / "cache"), "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import mmsa_emt; print(mmsa_emt.__file__)"], cwd=empty,
                           env=environ, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(env_dir), where  # the wheel's copy, not the checkout's
    run = subprocess.run([str(python), "-m", "mmsa_emt", "params"], cwd=empty, env=environ, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    total = next(line for line in run.stdout.splitlines() if line.startswith("total "))
    assert total.split()[1:] == list(PARAM_TOTALS.values()), run.stdout
    assert list(empty.iterdir()) == []  # nothing written into the folder it ran from
