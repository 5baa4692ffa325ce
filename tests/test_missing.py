"""The derived incomplete view equals what MMSA's own data_missing machinery gives EMT-DLFR."""

import pickle

import numpy as np
import pytest
from easydict import EasyDict
from MMSA.data_loader import MMDataset

from mmsa_emt.missing import drop_features, incomplete_view_file
from mmsa_emt.synthetic import write_dataset


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory, tiny_bert):
    path = tmp_path_factory.mktemp("missing") / "mosi.pkl"
    return write_dataset(path, "mosi", tokenizer=str(tiny_bert), scale=0.03, text_len=16, audio_len=12,
                         vision_len=10, text_feature_dim=16)


@pytest.mark.parametrize("rates", [(0.3, 0.5, 0.7), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)])
def test_same_masks_as_mmsa_data_missing(feature_file, rates):
    seeds = (111, 1111, 11111)
    with open(feature_file, "rb") as f:
        derived = drop_features(pickle.load(f), rates, seeds)
    for split in ("train", "test"):
        args = EasyDict(dataset_name="mosi", featurePath=str(feature_file), custom_feature=None, feature_T=None,
                        feature_A=None, feature_V=None, use_bert=True, need_data_aligned=False,
                        feature_dims=[768, 5, 20], data_missing=True, missing_rate=list(rates),
                        missing_seed=list(seeds), need_normalized=False)
        mmsa = MMDataset(args, mode=split)
        np.testing.assert_array_equal(derived[split]["text_bert"], mmsa.text_m)
        np.testing.assert_array_equal(derived[split]["audio"], mmsa.audio_m)
        np.testing.assert_array_equal(derived[split]["vision"], mmsa.vision_m)
        assert {derived[split][k].dtype for k in ("text_bert", "text", "audio", "vision")} == {np.dtype("float32")}


def test_text_features_follow_the_token_mask(feature_file):
    with open(feature_file, "rb") as f:
        data = pickle.load(f)
    derived = drop_features(data, (0.5, 0.0, 0.0), (1, 2, 3))["train"]
    ids_kept = derived["text_bert"][:, 0] != 100
    mask = data["train"]["text_bert"][:, 1].astype(bool)
    dropped = mask & ~ids_kept
    assert dropped.any()
    assert np.all(derived["text"][dropped] == 0)
    np.testing.assert_array_equal(derived["text"][mask & ids_kept], data["train"]["text"][mask & ids_kept])
    np.testing.assert_array_equal(derived["audio"], data["train"]["audio"])  # rate 0 changes nothing


def test_rate_one_keeps_only_cls_and_sep(feature_file):
    with open(feature_file, "rb") as f:
        data = pickle.load(f)
    derived = drop_features(data, (1.0, 1.0, 1.0), (1, 2, 3))["valid"]
    ids, mask = derived["text_bert"][:, 0], derived["text_bert"][:, 1]
    lengths = mask.sum(1).astype(int)
    assert np.all(ids[:, 0] == 101) and np.all(ids[np.arange(len(ids)), lengths - 1] == 102)
    inner = (np.arange(ids.shape[1])[None] > 0) & (np.arange(ids.shape[1])[None] < lengths[:, None] - 1)
    assert np.all(ids[inner] == 100)
    assert not derived["audio"].any() and not derived["vision"].any()


def test_incomplete_view_file_is_written_once(feature_file, tmp_path):
    first = incomplete_view_file(feature_file, (0.2, 0.2, 0.2), (111, 1111, 11111), tmp_path)
    stamp = first.stat().st_mtime_ns
    again = incomplete_view_file(feature_file, (0.2, 0.2, 0.2), (111, 1111, 11111), tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    other = incomplete_view_file(feature_file, (0.4, 0.4, 0.4), (111, 1111, 11111), tmp_path)
    assert other != first and not list(tmp_path.glob("*.tmp"))


def test_writers_of_the_same_incomplete_view_do_not_clash(feature_file, tmp_path, monkeypatch):
    """A second writer of the same file finishing while the first is still writing (two trials, or two sweeps,
    at once): each writes its own temporary file, so both end well and the file holds the whole incomplete view."""
    from mmsa_emt import missing

    real, cache = missing.drop_features, tmp_path / "cache"
    nested: list = []

    def drop_then_let_another_writer_finish(data, rates, seeds):
        if not nested:
            nested.append(None)
            nested[0] = incomplete_view_file(feature_file, (0.5,) * 3, (1, 2, 3), cache)
        return real(data, rates, seeds)

    monkeypatch.setattr(missing, "drop_features", drop_then_let_another_writer_finish)
    target = incomplete_view_file(feature_file, (0.5,) * 3, (1, 2, 3), cache)
    assert nested == [target]
    with open(feature_file, "rb") as f:
        expected = real(pickle.load(f), (0.5,) * 3, (1, 2, 3))
    with open(target, "rb") as f:
        written = pickle.load(f)
    np.testing.assert_array_equal(written["train"]["audio"], expected["train"]["audio"])
    assert [p.name for p in cache.iterdir()] == [target.name]  # no temporary file left behind
