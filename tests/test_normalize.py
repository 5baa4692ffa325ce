"""CH-SIMS input as the authors trained on it: train-statistics normalization of audio/vision (file, setting,
sweeps)."""

import copy
import hashlib
import pickle
from pathlib import Path

import MMSA.run as mmsa_run
import numpy as np
import pandas as pd
import pytest
from conftest import FEATURE_FILES, run_dirs
from MMSA import MMSA_run

from mmsa_emt import robustness
from mmsa_emt.cli import main
from mmsa_emt.data_check import FeatureFileError
from mmsa_emt.missing import drop_features
from mmsa_emt.mmsa import config as mmsa_config
from mmsa_emt.mmsa import data as mmsa_data
from mmsa_emt.normalize import normalize_features, sweep_normalization
from mmsa_emt.robustness import config_hash, sweep

SPLITS = ("train", "valid", "test")


def oracle(data: dict, modalities=("audio", "vision")) -> dict:
    """The authors' procedure restated literally: a loop per sample, numpy mean/std over the packed valid frames."""
    data = copy.deepcopy(data)
    stats = {}
    for split in SPLITS:
        for key in modalities:
            values, lengths = data[split][key], data[split][f"{key}_lengths"]
            packed = np.concatenate([values[i, :lengths[i]] for i in range(values.shape[0])])
            if split == "train":
                stats[key] = np.mean(packed, axis=0), np.std(packed, axis=0)
            mean, std = stats[key]
            for i in range(values.shape[0]):
                values[i, :lengths[i]] = (values[i, :lengths[i]] - mean) / (std + 1e-6)
    return data


def sims_like(seed: int = 0, sizes=(6, 4, 3), audio=(7, 4), vision=(5, 6)) -> dict:
    """A small SIMS-shaped feature dict: features with their own offsets and scales, zero padding, a sample of
    length 0, a full-length sample, and a vision feature constant in every split."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(SPLITS, sizes):
        text = np.stack([np.full((n, 8), 101.0), np.ones((n, 8)), np.zeros((n, 8))], 1).astype(np.float32)
        part = {"text_bert": text,
                "raw_text": [f"s{i}" for i in range(n)], "id": [f"{split}${i}" for i in range(n)]}
        for key, (t, d) in (("audio", audio), ("vision", vision)):
            values = (rng.normal(size=(n, t, d)) * rng.uniform(0.1, 30, d) + rng.uniform(-50, 50, d)).astype(np.float32)
            lengths = [int(v) for v in rng.integers(1, t + 1, n)]
            lengths[0], lengths[-1] = t, 0
            values[np.arange(t)[None] >= np.asarray(lengths)[:, None]] = 0
            part[key], part[f"{key}_lengths"] = values, lengths
        part["vision"][:, :, 2] = np.where(np.arange(vision[0])[None] < np.asarray(part["vision_lengths"])[:, None],
                                           np.float32(0.3), 0)
        for suffix in ("", "_T", "_A", "_V"):
            part[f"regression_labels{suffix}"] = rng.uniform(-1, 1, n).astype(np.float32)
        data[split] = part
    return data


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(data))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- the procedure
def test_equals_the_authors_procedure_and_leaves_its_input_alone():
    data = sims_like()
    before = copy.deepcopy(data)
    out, report = normalize_features(data, path="x.pkl")
    expected = oracle(data)
    for split in SPLITS:
        assert set(out[split]) == set(data[split])
        for key in ("audio", "vision"):
            assert out[split][key].dtype == data[split][key].dtype == np.float32
            np.testing.assert_array_equal(out[split][key], expected[split][key])  # same arithmetic: bit-equal
            assert out[split][key] is not data[split][key]
            np.testing.assert_array_equal(data[split][key], before[split][key])  # input untouched
        for key in ("text_bert", "audio_lengths", "regression_labels", "id"):
            assert out[split][key] is data[split][key]
    assert (out["valid"]["audio"][-1] == 0).all()  # a sample of length 0 is left as it was
    train = out["train"]["audio"][np.arange(7)[None] < np.asarray(data["train"]["audio_lengths"])[:, None]]
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-4)
    assert report.constant == {"audio": [], "vision": [2]} and report.samples == {"train": 6, "valid": 4, "test": 3}
    assert report.stats_frames["audio"] == sum(data["train"]["audio_lengths"])
    assert np.isfinite(out["test"]["vision"]).all() and (out["test"]["vision"][..., 2] == 0).all()


def test_float64_files_stay_float64_and_match():
    data = sims_like(seed=3)
    for split in SPLITS:
        for key in ("audio", "vision"):
            data[split][key] = data[split][key].astype(np.float64)
    out, _ = normalize_features(data, ["vision"])
    assert out["test"]["vision"].dtype == np.float64
    np.testing.assert_array_equal(out["test"]["vision"], oracle(data, ["vision"])["test"]["vision"])
    assert out["test"]["audio"] is data["test"]["audio"]  # only the modalities asked for


@pytest.mark.parametrize("plant,match", [
    (lambda d: d["valid"]["audio_lengths"].__setitem__(1, 99), r"x\.pkl', split 'valid', key 'audio_lengths'.*99"),
    (lambda d: d["train"]["vision_lengths"].__setitem__(2, -1), r"split 'train', key 'vision_lengths'.*-1"),
    (lambda d: d["test"]["vision"].__setitem__((0, 0, 0), np.nan), r"split 'test', key 'vision'.*NaN/inf.*sample 0"),
    (lambda d: d["train"]["audio"].__setitem__((0, 1, 3), np.inf), r"split 'train', key 'audio'.*1 NaN/inf"),
    (lambda d: d["train"].__setitem__("audio_lengths", [0] * 6), r"split 'train', key 'audio'.*no valid frame"),
    (lambda d: d["valid"].__setitem__("audio", d["valid"]["audio"].astype(np.int32)), r"'valid', key 'audio'.*int32"),
    (lambda d: d["test"].pop("vision_lengths"), r"split 'test', key 'vision_lengths'"),
])
def test_bad_input_is_an_error_naming_file_split_and_key(plant, match):
    data = sims_like()
    plant(data)
    with pytest.raises(FeatureFileError, match=match):
        normalize_features(data, path="x.pkl")


def test_nonfinite_padding_is_left_as_it_was():
    data = sims_like()
    data["valid"]["audio"][-1, 0, 0] = -np.inf  # the last valid sample has length 0: all padding
    out, _ = normalize_features(data)
    assert out["valid"]["audio"][-1, 0, 0] == -np.inf and np.isfinite(out["valid"]["audio"][:-1]).all()


def test_a_feature_constant_over_train_but_not_elsewhere_is_finite_and_warned():
    data = sims_like()
    data["test"]["vision"][0, 0, 2] = 0.5
    with pytest.warns(UserWarning, match=r"feature\(s\) \[2\] of 'vision'.*'test'.*2e\+05"):
        out, _ = normalize_features(data)
    assert out["test"]["vision"][0, 0, 2] == pytest.approx((0.5 - 0.3) / 1e-6, rel=1e-5)
    np.testing.assert_array_equal(out["test"]["vision"], oracle(data)["test"]["vision"])


# ----------------------------------------------------------------------------------------------- command line
def test_cli_writes_the_normalized_file_and_never_its_input(tmp_path, capsys):
    data = sims_like()
    source = write(tmp_path / "in" / "unaligned_39.pkl", data)
    before = digest(source)
    out = tmp_path / "out" / "unaligned_39_normalized.pkl"
    main(["normalize-features", "--in", str(source), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "train 6, valid 4, test 3" in printed and str(out) in printed
    assert "vision: 6 features" in printed and "1 constant over train" in printed
    written, expected = pickle.loads(out.read_bytes()), oracle(data)
    assert digest(source) == before
    assert list(written) == list(data) and list(written["train"]) == list(data["train"])
    for split in SPLITS:
        for key, value in data[split].items():
            assert type(written[split][key]) is type(value)
            if isinstance(value, np.ndarray):
                assert written[split][key].dtype == value.dtype
        for key in ("audio", "vision", "text_bert"):
            np.testing.assert_array_equal(written[split][key], expected[split][key])
    assert not list(out.parent.glob("*.tmp"))

    for target in (source, tmp_path / "in" / ".." / "in" / "unaligned_39.pkl"):
        with pytest.raises(SystemExit, match="is the input file"):
            main(["normalize-features", "--in", str(source), "--out", str(target), "--overwrite"])
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["normalize-features", "--in", str(source), "--out", str(out)])
    with pytest.raises(SystemExit, match=r"normalize-features: feature file '.*missing\.pkl' does not exist"):
        main(["normalize-features", "--in", str(tmp_path / "missing.pkl"), "--out", str(tmp_path / "x.pkl")])
    assert digest(source) == before
    main(["normalize-features", "--in", str(source), "--out", str(out), "--overwrite", "--modalities", "audio"])
    written = pickle.loads(out.read_bytes())
    np.testing.assert_array_equal(written["test"]["vision"], data["test"]["vision"])
    np.testing.assert_array_equal(written["test"]["audio"], expected["test"]["audio"])


# ----------------------------------------------------------------------------------------------- the setting
def test_mmsa_run_on_sims_normalizes_once_on_load(workspace, tmp_path, monkeypatch):
    """EMT-DLFR's SIMS entry normalizes by default: the loader's features are the normalized file's (incomplete
    view drawn from them), and a run on the raw file equals a run on the pre-normalized file with the setting off."""
    config = workspace("sims", scale=0.03)
    raw_path = config.parent / "dataset" / FEATURE_FILES["sims"]
    raw = pickle.loads(raw_path.read_bytes())
    normalized_path = tmp_path / "normalized.pkl"
    main(["normalize-features", "--in", str(raw_path), "--out", str(normalized_path)])
    expected = pickle.loads(normalized_path.read_bytes())
    captured, real = [], mmsa_data.checked_data_loader

    def capture(args, num_workers=4):
        captured.append(real(args, num_workers))
        return captured[-1]

    monkeypatch.setattr(mmsa_run, "MMDataLoader", capture)
    dirs = run_dirs(tmp_path)
    MMSA_run("EMT-DLFR", "sims", config_file=str(config), seeds=[1], gpu_ids=[], num_workers=0, **dirs)
    MMSA_run("EMT-DLFR", "sims", config_file=str(config), seeds=[1], gpu_ids=[], num_workers=0,
             custom_feature=str(normalized_path), config={"normalize_features": False}, **dirs)
    for loaders in captured:
        for split, loader in loaders.items():
            dataset = loader.dataset
            for key in ("audio", "vision"):
                np.testing.assert_array_equal(getattr(dataset, key), expected[split][key])
                mask = getattr(dataset, f"{key}_missing_mask")[..., None]
                np.testing.assert_array_equal(getattr(dataset, f"{key}_m"), expected[split][key] * mask)
            assert not np.array_equal(dataset.audio, raw[split]["audio"])
    frame = pd.read_csv(tmp_path / "results" / "normal" / "sims.csv")
    assert len(frame) == 2 and frame.iloc[0, 1:].tolist() == frame.iloc[1, 1:].tolist()
    log = (dirs["log_dir"] / "emt-dlfr-sims.log").read_text()
    assert log.count("normalize_features: audio (33 features") == 1 and f"'{raw_path}'" in log
    assert "valid frames of its 'train' split" in log


def test_the_setting_off_and_shared_content_normalized_once(workspace, tmp_path):
    config = workspace("sims", scale=0.03)
    args = mmsa_config.trial_args("EMT-DLFR", "sims", config, overrides={"normalize_features": False})
    raw = pickle.loads(Path(args["featurePath"]).read_bytes())
    loaders = mmsa_data.checked_data_loader(args, 0)
    np.testing.assert_array_equal(loaders["test"].dataset.audio, raw["test"]["audio"])
    args["normalize_features"] = True
    expected, _ = normalize_features(raw)
    shared = copy.deepcopy(raw)
    for _ in range(2):  # one content handed to two loaders: each normalizes a copy, the content stays raw
        loader = mmsa_data.checked_test_loader(args, data=shared)
        np.testing.assert_array_equal(loader.dataset.vision, expected["test"]["vision"])
    np.testing.assert_array_equal(shared["test"]["vision"], raw["test"]["vision"])
    at = [mmsa_data.at_missing_rates(args, (r,) * 3, tmp_path / "cache") for r in (0.0, 0.3, 0.6)]
    for loader in mmsa_data.checked_test_loaders(at):
        np.testing.assert_array_equal(loader.dataset.vision, expected["test"]["vision"])  # not normalized twice
    with pytest.raises(ValueError, match="'normalize_features' is 'yes'.*true or false"):
        mmsa_data.checked_data_loader({**args, "normalize_features": "yes"}, 0)


# ----------------------------------------------------------------------------------------------- sweeps
def test_sweep_gives_every_model_the_same_input(workspace, tmp_path):
    config = workspace("sims", scale=0.03)
    seen = []

    def fake_trial(spec, config_file, *, out_dir, overrides, **kwargs):
        seen.append((spec.model, overrides["normalize_features"]))
        digest = config_hash(spec.model, spec.dataset, config_file, overrides,
                             digest_cache=Path(out_dir) / robustness.DIGEST_CACHE)
        return [{**dict(zip(robustness.KEY_COLUMNS, [spec.model, spec.dataset, spec.protocol, *spec.train_rates,
                                                     *rates, spec.seed, digest])),
                 "MAE": 1.0, "Corr": 0.0, "checkpoint": "-", "seconds": 0.0, "finished_at": "-"}
                for rates in spec.test_rates]

    for overrides, value in ((None, True), ({"normalize_features": False}, False)):
        seen.clear()
        sweep(["EMT-DLFR", "Self_MM"], "sims", config, rates=[0.0], seeds=[1], out_dir=tmp_path / str(value),
              overrides=overrides, trial_fn=fake_trial, progress=False, echo=lambda _: None)
        assert seen == [("EMT-DLFR", value), ("Self_MM", value)]
    assert sweep_normalization("mosi", workspace("mosi")) is False
    assert config_hash("self_mm", "sims", config, {"normalize_features": True}) != \
        config_hash("self_mm", "sims", config, {"normalize_features": False})

    # a baseline reads a derived file: normalized once, then MMSA's incomplete view of it, equal to EMT-DLFR's
    cache, rates, seeds = tmp_path / "cache", (0.4, 0.4, 0.4), [111, 1111, 11111]
    views = {}
    for model in ("EMT-DLFR", "Self_MM"):
        overrides = {"normalize_features": True, "missing_seed": seeds}
        args = mmsa_config.trial_args(model, "sims", config, overrides=overrides)
        views[model] = mmsa_data.checked_data_loader(mmsa_data.at_missing_rates(args, rates, cache), 0)
    raw = pickle.loads(Path(args["featurePath"]).read_bytes())
    dropped = drop_features(normalize_features(raw)[0], rates, seeds)
    assert len(list(cache.glob("*-normalized-????????????.pkl"))) == 1  # the baseline's source, once
    for split in SPLITS:
        ours, theirs = views["EMT-DLFR"][split].dataset, views["Self_MM"][split].dataset
        for key in ("audio", "vision"):
            np.testing.assert_array_equal(getattr(theirs, key), dropped[split][key])
            np.testing.assert_array_equal(getattr(theirs, key), getattr(ours, f"{key}_m"))
