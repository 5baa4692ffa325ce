"""Tests for mmsa_emt.data_check (CPU only, small synthetic feature files)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from mmsa_emt.data_check import (
    FeatureFileError,
    FeatureFileNotFoundError,
    FeatureReport,
    check_feature_file,
    load_feature_file,
    zero_nonfinite,
)

N, L = 6, 8
TA, DA = 7, 3
TV, DV = 5, 4
SIMS_KEYS = ("regression_labels_T", "regression_labels_A", "regression_labels_V")


def make_split(n: int = N, seed: int = 0, sims: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    text_bert = np.zeros((n, 3, L), dtype=np.float64)
    real = rng.integers(2, L + 1, size=n)  # tokens incl. [CLS] and [SEP]
    for i, k in enumerate(real):
        text_bert[i, 0, :k] = rng.integers(1000, 2000, size=k)
        text_bert[i, 0, 0] = 101
        text_bert[i, 0, k - 1] = 102
        text_bert[i, 1, :k] = 1
    split = {
        "text_bert": text_bert,
        "text": rng.normal(size=(n, L, 5)).astype(np.float32),
        "audio": rng.normal(size=(n, TA, DA)).astype(np.float32),
        "vision": rng.normal(size=(n, TV, DV)).astype(np.float32),
        "audio_lengths": [int(x) for x in rng.integers(1, TA + 1, size=n)],
        "vision_lengths": rng.integers(1, TV + 1, size=n),
        "regression_labels": rng.uniform(-3, 3, size=n).astype(np.float32),
        "raw_text": [f"sentence {i}" for i in range(n)],
        "id": np.array([f"clip_{seed}_{i}" for i in range(n)], dtype=object),
    }
    if sims:
        for key in SIMS_KEYS:
            split[key] = rng.uniform(-1, 1, size=n).astype(np.float32)
    return split


def make_data(sims: bool = False) -> dict:
    return {
        s: make_split(seed=i, sims=sims)
        for i, s in enumerate(("train", "valid", "test"))
    }


def write(tmp_path: Path, data, name: str = "feat.pkl") -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


@pytest.fixture
def data() -> dict:
    return make_data()


def expect_error(
    path: Path, *fragments: str, exc: type[Exception] = FeatureFileError, **kwargs
):
    with pytest.raises(exc) as info:
        check_feature_file(path, **kwargs)
    message = str(info.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# --------------------------------------------------------------------------- valid files


def test_valid_file_report(tmp_path, data):
    path = write(tmp_path, data)
    report = check_feature_file(path)
    assert isinstance(report, FeatureReport)
    assert report.path == path
    assert report.splits == {"train": N, "valid": N, "test": N}
    assert list(report.splits) == ["train", "valid", "test"]
    assert report.text_len == L
    assert report.audio_shape == (TA, DA)
    assert report.vision_shape == (TV, DV)
    expected_max = max(int(data[s]["text_bert"][:, 0].max()) for s in data)
    assert report.max_token_id == expected_max
    assert isinstance(report.max_token_id, int)
    assert report.nonfinite == {}


def test_valid_file_without_bert(tmp_path, data):
    for split in data.values():
        del split["text_bert"]
    report = check_feature_file(write(tmp_path, data), use_bert=False)
    assert report.text_len == L
    assert report.max_token_id is None


def test_aligned_file_without_lengths(tmp_path, data):
    for split in data.values():
        del split["audio_lengths"], split["vision_lengths"]
    report = check_feature_file(write(tmp_path, data), need_lengths=False)
    assert report.splits["train"] == N


def test_sims_extra_labels(tmp_path):
    path = write(tmp_path, make_data(sims=True))
    assert check_feature_file(path, extra_label_keys=SIMS_KEYS).splits["test"] == N


def test_labels_column_and_integral_float_lengths_accepted(tmp_path, data):
    data["train"]["regression_labels"] = data["train"]["regression_labels"].reshape(
        -1, 1
    )
    data["valid"]["audio_lengths"] = np.asarray(
        data["valid"]["audio_lengths"], dtype=np.float32
    )
    data["test"]["audio_lengths"][0] = 0  # 0 and T are both inside [0, T]
    data["test"]["vision_lengths"][0] = TV
    check_feature_file(write(tmp_path, data))


def test_int_token_ids_accepted(tmp_path, data):
    for split in data.values():
        split["text_bert"] = split["text_bert"].astype(np.int64)
    assert check_feature_file(write(tmp_path, data)).max_token_id is not None


# --------------------------------------------------------------------------- file level


def test_missing_file_is_file_not_found(tmp_path):
    path = tmp_path / "nope" / "unaligned_50.pkl"
    with pytest.raises(FileNotFoundError) as info:
        check_feature_file(path)
    err = info.value
    assert isinstance(err, FeatureFileError)
    assert isinstance(err, FeatureFileNotFoundError)
    assert isinstance(err, ValueError)
    assert str(path) in str(err)
    assert err.filename == str(path)


def test_missing_file_config_hint(tmp_path):
    hint = (
        "built from datasetCommonParams.dataset_root_dir='/data' + "
        "datasetCommonParams.mosi.unaligned.featurePath='MOSI/Processed/unaligned_50.pkl' "
        "in config/config_regression.json"
    )
    path = tmp_path / "unaligned_50.pkl"
    err = expect_error(path, hint, exc=FileNotFoundError, config_hint=hint)
    assert isinstance(err, FeatureFileError)


def test_config_hint_in_other_errors(tmp_path, data):
    del data["valid"]["audio"]
    expect_error(
        write(tmp_path, data),
        "valid",
        "audio",
        "see config X",
        config_hint="see config X",
    )


def test_not_a_pickle(tmp_path):
    path = tmp_path / "garbage.pkl"
    path.write_bytes(b"this is not a pickle")
    expect_error(path, "pickle")


def test_truncated_pickle(tmp_path, data):
    path = write(tmp_path, data)
    path.write_bytes(path.read_bytes()[:100])
    expect_error(path, "pickle")


def test_directory_instead_of_file(tmp_path):
    path = tmp_path / "feat.pkl"
    path.mkdir()
    expect_error(path, "not a regular file")


def test_not_a_dict(tmp_path):
    expect_error(write(tmp_path, [1, 2, 3]), "list", "dict")


def test_missing_split(tmp_path, data):
    del data["valid"]
    err = expect_error(write(tmp_path, data), "valid", "'train'", "'test'")
    assert err.split == "valid"


def test_split_not_a_dict(tmp_path, data):
    data["test"] = np.zeros(3)
    expect_error(write(tmp_path, data), "split 'test'", "ndarray")


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key",
    [
        "text_bert",
        "audio",
        "vision",
        "regression_labels",
        "id",
        "raw_text",
        "audio_lengths",
        "vision_lengths",
    ],
)
def test_missing_key(tmp_path, data, key):
    del data["valid"][key]
    err = expect_error(
        write(tmp_path, data), "split 'valid'", f"'{key}'", "keys present", "'text'"
    )
    assert (err.split, err.key) == ("valid", key)


def test_missing_text_without_bert(tmp_path, data):
    del data["test"]["text"]
    expect_error(
        write(tmp_path, data),
        "split 'test'",
        "key 'text'",
        "'text_bert'",
        use_bert=False,
    )


def test_missing_extra_label_key(tmp_path, data):
    expect_error(
        write(tmp_path, data),
        "split 'train'",
        "regression_labels_T",
        "keys present",
        extra_label_keys=SIMS_KEYS,
    )


def test_lengths_not_needed_when_aligned(tmp_path, data):
    del data["train"]["audio_lengths"]
    path = write(tmp_path, data)
    check_feature_file(path, need_lengths=False)
    expect_error(path, "split 'train'", "audio_lengths")


# --------------------------------------------------------------------------- shapes


def test_text_bert_wrong_shape(tmp_path, data):
    data["train"]["text_bert"] = data["train"]["text_bert"][:, :2]
    expect_error(
        write(tmp_path, data),
        "split 'train'",
        "key 'text_bert'",
        f"({N}, 2, {L})",
        "(N, 3, L)",
    )


def test_text_bert_wrong_rank(tmp_path, data):
    data["valid"]["text_bert"] = data["valid"]["text_bert"][:, 0]
    expect_error(
        write(tmp_path, data),
        "split 'valid'",
        "key 'text_bert'",
        f"({N}, {L})",
        "(N, 3, L)",
    )


@pytest.mark.parametrize("key", ["audio", "vision"])
def test_audio_vision_wrong_rank(tmp_path, data, key):
    data["test"][key] = data["test"][key].mean(axis=1)
    expect_error(
        write(tmp_path, data), "split 'test'", f"key '{key}'", "expected (N, T"
    )


def test_list_instead_of_array(tmp_path, data):
    data["train"]["audio"] = data["train"]["audio"].tolist()
    expect_error(
        write(tmp_path, data), "split 'train'", "key 'audio'", "list", "numpy.ndarray"
    )


def test_non_numeric_array(tmp_path, data):
    data["train"]["vision"] = np.full((N, TV, DV), "x")
    expect_error(write(tmp_path, data), "split 'train'", "key 'vision'", "dtype")


def test_labels_wrong_shape(tmp_path, data):
    data["valid"]["regression_labels"] = np.zeros((N, 2))
    expect_error(
        write(tmp_path, data),
        "split 'valid'",
        "key 'regression_labels'",
        f"({N}, 2)",
        "(N,)",
    )


@pytest.mark.parametrize(
    "key", ["audio", "vision", "regression_labels", "id", "raw_text", "audio_lengths"]
)
def test_inconsistent_sample_count(tmp_path, data, key):
    data["train"][key] = data["train"][key][:-1]
    err = expect_error(
        write(tmp_path, data),
        "split 'train'",
        f"key '{key}'",
        f"{N - 1} samples",
        f"{N}",
    )
    assert err.key == key


def test_empty_split(tmp_path, data):
    data["test"] = {k: v[:0] for k, v in data["test"].items()}
    expect_error(write(tmp_path, data), "split 'test'", "no samples")


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        ("audio", (N, TA + 1, DA), f"(N, {TA}, {DA})"),
        ("audio", (N, TA, DA + 2), f"(N, {TA}, {DA})"),
        ("vision", (N, TV, DV + 1), f"(N, {TV}, {DV})"),
        ("text_bert", None, f"(N, 3, {L})"),
    ],
)
def test_shape_mismatch_across_splits(tmp_path, data, key, shape, expected):
    if key == "text_bert":
        data["valid"]["text_bert"] = np.concatenate(
            [data["valid"]["text_bert"], np.zeros((N, 3, 2))], axis=2
        )
        shape = (N, 3, L + 2)
    else:
        data["valid"][key] = np.zeros(shape, dtype=np.float32)
    found = "(" + ", ".join(map(str, shape)) + ")"
    expect_error(
        write(tmp_path, data),
        "split 'valid'",
        f"key '{key}'",
        found,
        expected,
        "split 'train'",
    )


def test_text_dim_mismatch_without_bert(tmp_path, data):
    data["test"]["text"] = np.zeros((N, L, 7), dtype=np.float32)
    expect_error(
        write(tmp_path, data),
        "split 'test'",
        "key 'text'",
        f"(N, {L}, 5)",
        use_bert=False,
    )


# --------------------------------------------------------------------------- lengths


def test_length_beyond_sequence(tmp_path, data):
    data["valid"]["audio_lengths"][3] = TA + 2
    err = expect_error(
        write(tmp_path, data),
        "split 'valid'",
        "key 'audio_lengths'",
        "sample 3",
        f"length {TA + 2}",
        f"{TA}",
    )
    assert err.key == "audio_lengths"


def test_negative_length(tmp_path, data):
    data["test"]["vision_lengths"][4] = -1
    expect_error(
        write(tmp_path, data), "split 'test'", "key 'vision_lengths'", "sample 4", "-1"
    )


def test_fractional_length(tmp_path, data):
    lengths = np.asarray(data["train"]["vision_lengths"], dtype=np.float64)
    lengths[2] = 2.5
    data["train"]["vision_lengths"] = lengths
    expect_error(
        write(tmp_path, data),
        "split 'train'",
        "key 'vision_lengths'",
        "sample 2",
        "2.5",
        "integer",
    )


def test_none_length(tmp_path, data):
    data["train"]["audio_lengths"][1] = None
    expect_error(write(tmp_path, data), "split 'train'", "key 'audio_lengths'")


def test_lengths_wrong_rank(tmp_path, data):
    data["train"]["audio_lengths"] = np.ones((N, 2), dtype=np.int64)
    expect_error(
        write(tmp_path, data), "split 'train'", "key 'audio_lengths'", f"({N}, 2)"
    )


# --------------------------------------------------------------------------- text_bert values


def test_negative_token_id(tmp_path, data):
    data["valid"]["text_bert"][2, 0, 1] = -5
    expect_error(
        write(tmp_path, data),
        "split 'valid'",
        "key 'text_bert'",
        "sample 2",
        "-5",
        "token ids",
    )


def test_fractional_token_id(tmp_path, data):
    data["valid"]["text_bert"][1, 0, 0] = 101.5
    expect_error(
        write(tmp_path, data), "split 'valid'", "key 'text_bert'", "sample 1", "101.5"
    )


def test_mask_not_binary(tmp_path, data):
    data["test"]["text_bert"][5, 1, 0] = 2
    expect_error(
        write(tmp_path, data),
        "split 'test'",
        "key 'text_bert'",
        "sample 5",
        "mask",
        "2",
    )


def test_mask_not_prefix(tmp_path, data):
    mask = data["train"]["text_bert"][3, 1]
    mask[:] = 1
    mask[1] = 0
    expect_error(
        write(tmp_path, data), "split 'train'", "key 'text_bert'", "sample 3", "prefix"
    )


def test_mask_too_short(tmp_path, data):
    data["train"]["text_bert"][4, 1] = 0
    data["train"]["text_bert"][4, 1, 0] = 1
    expect_error(
        write(tmp_path, data),
        "split 'train'",
        "key 'text_bert'",
        "sample 4",
        "[CLS]",
        "covers 1",
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_text_bert(tmp_path, data, bad):
    data["valid"]["text_bert"][1, 2, 3] = bad
    expect_error(
        write(tmp_path, data), "split 'valid'", "key 'text_bert'", "NaN/inf", "sample 1"
    )


def test_nonfinite_text_without_bert(tmp_path, data):
    data["test"]["text"][0, 0, 0] = np.nan
    expect_error(
        write(tmp_path, data), "split 'test'", "key 'text'", "NaN/inf", use_bert=False
    )


def test_nonfinite_label(tmp_path, data):
    data["train"]["regression_labels"][5] = np.nan
    expect_error(
        write(tmp_path, data),
        "split 'train'",
        "key 'regression_labels'",
        "NaN/inf",
        "sample 5",
    )


def test_nonfinite_extra_label(tmp_path):
    data = make_data(sims=True)
    data["test"]["regression_labels_V"][0] = np.inf
    expect_error(
        write(tmp_path, data),
        "split 'test'",
        "key 'regression_labels_V'",
        "NaN/inf",
        extra_label_keys=SIMS_KEYS,
    )


# --------------------------------------------------------------------------- audio/vision non-finite


def test_nonfinite_audio_vision_counted_not_raised(tmp_path, data):
    data["train"]["audio"][0, 0, 0] = np.nan
    data["train"]["audio"][1, 2, 1] = -np.inf
    data["train"]["audio"][5, 6, 2] = np.inf
    data["test"]["vision"][3, 4, :] = np.nan
    report = check_feature_file(write(tmp_path, data))
    assert report.nonfinite == {("train", "audio"): 3, ("test", "vision"): DV}


def test_nonfinite_count_large_chunked(tmp_path, data):
    big = np.zeros((2500, TA, DA), dtype=np.float32)  # spans several scan chunks
    big[::100, 0, 0] = np.nan
    big[-1] = np.inf
    split = data["train"]
    split["audio"] = big
    n = big.shape[0]
    split.update(
        text_bert=np.repeat(split["text_bert"][:1], n, axis=0),
        vision=np.zeros((n, TV, DV), dtype=np.float32),
        audio_lengths=np.full(n, TA),
        vision_lengths=np.full(n, TV),
        regression_labels=np.zeros(n),
        raw_text=["x"] * n,
        id=[str(i) for i in range(n)],
    )
    report = check_feature_file(write(tmp_path, data))
    assert report.splits["train"] == n
    assert report.nonfinite == {("train", "audio"): 25 + TA * DA}


def test_zero_nonfinite():
    a = np.array([[1.0, np.nan], [np.inf, -np.inf]], dtype=np.float32)
    out = zero_nonfinite(a)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1.0, 0.0], [0.0, 0.0]])
    assert np.isnan(a[0, 1])  # input untouched
    ints = np.arange(3)
    assert zero_nonfinite(ints) is not ints
    np.testing.assert_array_equal(zero_nonfinite(ints), ints)


def test_error_is_value_error(tmp_path, data):
    del data["train"]["id"]
    with pytest.raises(ValueError):
        check_feature_file(write(tmp_path, data))


# --------------------------------------------------------------------------- files that exist but do not unpickle

CONFIG_HINT = (
    "built from datasetCommonParams.dataset_root_dir='/data' + "
    "datasetCommonParams.mosi.unaligned.featurePath='MOSI/Processed/unaligned_50.pkl' in config.json"
)


def _unpicklable(kind: str) -> bytes:
    valid = pickle.dumps(make_data(), protocol=4)
    return {
        "truncated": valid[: len(valid) // 2],
        "empty": b"",
        "corrupt": valid[:11] + b"\xff" + valid[12:],  # the first opcode after PROTO and FRAME
        "not a pickle": b"this is not a pickle",
        "module not importable": b"cmmsa_missing_pkg.features\nFeatureTable\n)\x81.",
        "class not in its module": b"cmath\nNoSuchClass\n)\x81.",
    }[kind]


@pytest.mark.parametrize("kind,cause,likely", [
    ("truncated", "UnpicklingError: pickle data was truncated", "truncated"),
    ("empty", "EOFError", "truncated"),
    ("corrupt", "UnpicklingError: invalid load key", "corrupt or is not a pickle"),
    ("not a pickle", "UnpicklingError", "corrupt or is not a pickle"),
    ("module not importable", "ModuleNotFoundError: No module named 'mmsa_missing_pkg'", "cannot be imported"),
    ("class not in its module", "AttributeError: Can't get attribute 'NoSuchClass'", "class that cannot be imported"),
])
@pytest.mark.parametrize("loader", ["check_feature_file", "load_feature_file"])
def test_a_file_that_does_not_unpickle_is_named_without_blaming_the_config(tmp_path, kind, cause, likely, loader):
    """The path was right (the file exists): the error names the file and the unpickling error, and does not
    point at dataset_root_dir/featurePath, which only a missing file does."""
    path = tmp_path / "unaligned_50.pkl"
    path.write_bytes(_unpicklable(kind))
    load = check_feature_file if loader == "check_feature_file" else load_feature_file
    with pytest.raises(FeatureFileError) as info:
        load(path, config_hint=CONFIG_HINT)
    message = str(info.value)
    assert f"feature file '{path}' exists but could not be unpickled" in message
    assert cause in message and likely in message
    assert "dataset_root_dir" not in message and "featurePath" not in message
    assert not isinstance(info.value, FileNotFoundError)
    assert info.value.path == path and info.value.__cause__ is not None


def test_an_unreadable_file_is_named_without_blaming_the_config(tmp_path, monkeypatch):
    path = tmp_path / "unaligned_50.pkl"
    path.write_bytes(pickle.dumps(make_data()))

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refused)  # chmod does not stop a root user
    with pytest.raises(FeatureFileError) as info:
        load_feature_file(path, config_hint=CONFIG_HINT)
    monkeypatch.undo()
    message = str(info.value)
    assert f"feature file '{path}' exists but cannot be read (PermissionError" in message
    assert "dataset_root_dir" not in message


def test_only_a_missing_file_gets_the_config_hint(tmp_path, data):
    missing = tmp_path / "unaligned_50.pkl"
    with pytest.raises(FileNotFoundError, match="dataset_root_dir='/data'"):
        load_feature_file(missing, config_hint=CONFIG_HINT)
    assert load_feature_file(write(tmp_path, data), config_hint=CONFIG_HINT).keys() == data.keys()
