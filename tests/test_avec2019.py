"""Tests for mmsa_emt.avec2019: E-DAIC (AVEC2019 DDS) -> MMSA feature file."""

import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
from easydict import EasyDict
from transformers import BertTokenizer

from mmsa_emt import avec2019
from mmsa_emt.avec2019 import Layout, convert, select_utterances, window_statistics, write_synthetic_edaic
from mmsa_emt.data_check import check_feature_file

SHAPES = {"text_len": 32, "audio_frames": 50, "vision_frames": 40, "text_feature_dim": 16, "progress": False}
SPLIT_FILES = {"train": "train_split.csv", "valid": "dev_split.csv", "test": "test_split.csv"}
AUDIO_DIM, VISION_DIM = 2 * 39, 2 * (17 + 6)  # mean + std of 39 MFCCs / of 17 AU intensities + 6 pose


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return BertTokenizer.from_pretrained(str(tiny_bert))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_edaic(tmp_path_factory.mktemp("edaic") / "E-DAIC", broken=["302"])


@pytest.fixture(scope="module")
def converted(corpus, tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "avec2019.pkl"
    summary = convert(corpus, out, tokenizer=str(tiny_bert), **SHAPES)
    with open(out, "rb") as f:
        return summary, pickle.load(f)


def _labels(root, split):
    df = pd.read_csv(root / "labels" / SPLIT_FILES[split])
    return dict(zip(df["Participant_ID"].astype(str), df["PHQ_Score"].astype(float)))


# ----------------------------------------------------------------------------- the synthetic corpus


def test_synthetic_corpus_uses_edaic_names(corpus):
    folder = corpus / "300_P"
    assert (folder / "300_Transcript.csv").is_file()
    mfcc = (folder / "features" / "300_OpenSMILE2.3.0_mfcc.csv").read_text().splitlines()[0].split(";")
    assert mfcc[:3] == ["name", "frameTime", "pcm_fftMag_mfcc[0]"] and len(mfcc) == 2 + 39
    header = (folder / "features" / "300_OpenFace2.1.0_Pose_gaze_AUs.csv").read_text().splitlines()[0]
    assert header.startswith("frame, timestamp, confidence, success, pose_Tx")  # OpenFace's leading spaces
    assert " AU01_r" in header and " AU45_c" in header and " gaze_angle_y" in header
    transcript = pd.read_csv(folder / "300_Transcript.csv")
    assert list(transcript.columns) == ["Start_Time", "End_Time", "Text", "Confidence"]
    split = pd.read_csv(corpus / "labels" / "dev_split.csv")
    assert {"Participant_ID", "PHQ_Score", "PHQ_Binary"} <= set(split.columns) and len(split) == 3
    assert not (corpus / "302_P" / "features" / "302_OpenFace2.1.0_Pose_gaze_AUs.csv").exists()


def test_synthetic_corpus_deterministic(tmp_path):
    a, b = write_synthetic_edaic(tmp_path / "a", seed=3), write_synthetic_edaic(tmp_path / "b", seed=3)
    c = write_synthetic_edaic(tmp_path / "c", seed=4)
    rel = "301_P/features/301_OpenSMILE2.3.0_mfcc.csv"
    assert (a / rel).read_bytes() == (b / rel).read_bytes() != (c / rel).read_bytes()


# ----------------------------------------------------------------------------- conversion


def test_broken_participant_reported_others_kept(converted, corpus):
    summary, data = converted
    assert summary.kept == {"train": 4, "valid": 3, "test": 3}
    assert [(s.participant, s.split) for s in summary.skipped] == [("302", "train")]
    skip = summary.skipped[0]
    assert skip.file == "302_P/features/302_OpenFace2.1.0_Pose_gaze_AUs.csv" and skip.reason == "file not found"
    text = str(summary)
    assert "train 4, valid 3, test 3" in text and "302_OpenFace2.1.0_Pose_gaze_AUs.csv: file not found" in text
    assert summary.feature_dims == (16, AUDIO_DIM, VISION_DIM) and summary.seq_lens == (32, 50, 40)
    assert list(data["train"]["id"]) == ["avec2019$_$300", "avec2019$_$301", "avec2019$_$303", "avec2019$_$304"]
    assert list(data["valid"]["id"]) == ["avec2019$_$305", "avec2019$_$306", "avec2019$_$307"]


def test_feature_file_passes_check(converted):
    summary, data = converted
    report = check_feature_file(summary.path)
    assert report.splits == summary.kept and report.text_len == 32
    assert report.audio_shape == (50, AUDIO_DIM) and report.vision_shape == (40, VISION_DIM)
    assert check_feature_file(summary.path, use_bert=False).splits == summary.kept
    for d in data.values():
        n = len(d["id"])
        for k in ("text_bert", "text", "audio", "vision", "regression_labels", "classification_labels"):
            assert d[k].dtype == np.float32 and len(d[k]) == n, k
        assert d["text"].shape == (n, 32, 16)
        for m, t in (("audio", 50), ("vision", 40)):
            lengths = np.array(d[f"{m}_lengths"])
            assert all(type(v) is int for v in d[f"{m}_lengths"]) and lengths.min() >= 1 and lengths.max() <= t
            valid = np.arange(t)[None] < lengths[:, None]
            assert (d[m][~valid] == 0).all() and np.isfinite(d[m]).all()
        assert d["raw_text"].dtype.kind == "U" and d["id"].dtype.kind == "U"


def test_labels_are_phq_scores(converted, corpus):
    _, data = converted
    for split in SPLIT_FILES:
        truth = _labels(corpus, split)
        d = data[split]
        pids = [s.split("$_$")[1] for s in d["id"]]
        assert np.array_equal(d["regression_labels"], np.array([truth[p] for p in pids], dtype=np.float32))
        assert np.array_equal(d["classification_labels"], (d["regression_labels"] >= 10).astype(np.float32))


def test_mmsa_loader_accepts_file(converted):
    from MMSA.data_loader import MMDataLoader

    summary, data = converted
    # MMSA's MMDataset only knows mosi/mosei/sims; the file is read like MOSI's
    args = EasyDict(
        dataset_name="mosi", featurePath=str(summary.path), use_bert=True, need_data_aligned=False,
        feature_dims=[768, 5, 20], seq_lens=[50, 50, 50], batch_size=2, custom_feature=None,
        feature_T=None, feature_A=None, feature_V=None, data_missing=True,
        missing_rate=[0.5, 0.5, 0.5], missing_seed=[111, 1111, 11111], need_normalized=False,
    )
    loaders = MMDataLoader(args, num_workers=0)
    batch = next(iter(loaders["train"]))
    assert batch["text"].shape == (2, 3, 32) and batch["text_m"].shape == (2, 3, 32)
    assert batch["audio"].shape == (2, 50, AUDIO_DIM) and batch["vision_m"].shape == (2, 40, VISION_DIM)
    assert list(args.seq_lens) == [32, 50, 40] and args.feature_dims[1:] == [AUDIO_DIM, VISION_DIM]
    labels = sorted(float(v) for split in ("test",) for b in loaders[split] for v in b["labels"]["M"].view(-1))
    assert labels == sorted(data["test"]["regression_labels"].tolist())


def test_text_cls_sep_and_time_order(converted, corpus, tok):
    _, data = converted
    for d in data.values():
        ids, mask = d["text_bert"][:, 0].astype(int), d["text_bert"][:, 1]
        lengths = mask.sum(1).astype(int)
        assert np.array_equal(mask, (np.arange(32)[None] < lengths[:, None]).astype(np.float32))
        assert (ids[:, 0] == 101).all() and (ids[np.arange(len(ids)), lengths - 1] == 102).all()
        assert (ids[mask == 0] == 0).all() and (d["text_bert"][:, 2] == 0).all()
        for row, n, raw in zip(ids, lengths, d["raw_text"]):  # the ids are exactly the kept text's pieces
            assert n > 2 and row[1 : n - 1].tolist() == tok(str(raw), add_special_tokens=False)["input_ids"]
    # kept utterances appear in Start_Time order although the file rows are shuffled
    transcript = pd.read_csv(corpus / "305_P" / "305_Transcript.csv")
    ordered = transcript.sort_values("Start_Time")["Text"].tolist()
    raw = str(data["valid"]["raw_text"][0])
    positions = [raw.find(t) for t in ordered if t in raw]
    assert positions == sorted(positions) and len(positions) >= 1


def test_long_transcript_respects_budget(tmp_path, tok):
    root = write_synthetic_edaic(tmp_path / "long", {"train": [300, 301], "valid": [302], "test": [303]},
                                 sentences=(40, 50))
    out = tmp_path / "long.pkl"
    convert(root, out, tokenizer=tok, **{**SHAPES, "text_len": 24})
    with open(out, "rb") as f:
        data = pickle.load(f)
    for d in data.values():
        ids, mask = d["text_bert"][:, 0].astype(int), d["text_bert"][:, 1]
        lengths = mask.sum(1).astype(int)
        assert (lengths <= 24).all() and (lengths > 2).all()
        assert (ids[:, 0] == 101).all() and (ids[np.arange(len(ids)), lengths - 1] == 102).all()
        for pid, row, n, raw in zip(d["id"], ids, lengths, d["raw_text"]):
            assert row[1 : n - 1].tolist() == tok(str(raw), add_special_tokens=False)["input_ids"]
            pid = pid.split("$_$")[1]
            utterances = pd.read_csv(root / f"{pid}_P" / f"{pid}_Transcript.csv").sort_values("Start_Time")
            assert len(str(raw)) < len(" ".join(utterances["Text"]))  # only part of the interview is kept


def test_select_utterances():
    assert select_utterances([3, 4, 5], 12) == [0, 1, 2]
    assert select_utterances([5] * 10, 20) == [1, 3, 6, 8]  # 4 runs of 2.5 utterances, middle of each
    assert select_utterances([5] * 10, 5) == [5]
    assert select_utterances([30, 1, 30], 10) == [1]
    assert select_utterances([30, 30, 30], 10) == []  # not even one fits: the caller cuts the middle one
    assert select_utterances([], 10) == []


def test_single_huge_utterance_is_cut(tmp_path, tok):
    root = write_synthetic_edaic(tmp_path / "c", {"train": [300], "valid": [301], "test": [302]})
    path = root / "300_P" / "300_Transcript.csv"
    pd.DataFrame({"Start_Time": [1.0], "End_Time": [90.0], "Text": ["so " * 100], "Confidence": [0.9]}).to_csv(
        path, index=False)
    convert(root, tmp_path / "c.pkl", tokenizer=tok, **SHAPES)
    with open(tmp_path / "c.pkl", "rb") as f:
        row = pickle.load(f)["train"]["text_bert"][0]
    assert (row[1] == 1).all() and row[0, 0] == 101 and row[0, -1] == 102
    assert (row[0, 1:-1] == tok.convert_tokens_to_ids("so")).all()


# ----------------------------------------------------------------------------- windowed statistics


def test_window_statistics_hand_checked():
    x = np.arange(30, dtype=np.float64).reshape(10, 3) ** 1.5
    got = window_statistics(x, 5)
    assert got.shape == (5, 6) and got.dtype == np.float32
    chunks = np.array_split(x, 5)
    np.testing.assert_allclose(got[:, :3], [c.mean(0) for c in chunks], rtol=1e-6)
    np.testing.assert_allclose(got[:, 3:], [c.std(0) for c in chunks], rtol=1e-5)
    # uneven windows (sizes 3, 2, 2) and more statistics
    y = np.random.default_rng(0).standard_normal((7, 2))
    got = window_statistics(y, 3, ("mean", "std", "min", "max"))
    chunks = np.array_split(y, 3)
    expected = [np.concatenate([c.mean(0), c.std(0), c.min(0), c.max(0)]) for c in chunks]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # fewer frames than windows: one window per frame, std 0; non-finite -> 0
    z = np.array([[1.0, np.nan], [np.inf, 2.0]])
    np.testing.assert_array_equal(window_statistics(z, 500), [[1, 0, 0, 0], [0, 2, 0, 0]])
    with pytest.raises(ValueError, match="window_stats"):
        window_statistics(x, 5, ("mean", "median"))


def test_window_statistics_in_feature_file(converted, corpus):
    _, data = converted
    df = pd.read_csv(corpus / "300_P" / "features" / "300_OpenSMILE2.3.0_mfcc.csv", sep=";")
    frames = df.drop(columns=["name", "frameTime"]).to_numpy()
    d = data["train"]
    n = d["audio_lengths"][0]
    assert n == min(50, len(frames))
    np.testing.assert_allclose(d["audio"][0, :n], window_statistics(frames, 50), rtol=1e-6)
    of = pd.read_csv(corpus / "300_P" / "features" / "300_OpenFace2.1.0_Pose_gaze_AUs.csv", skipinitialspace=True)
    of = of[of["success"] == 1]  # failed frames are dropped
    cols = [c for c in of.columns if c.startswith("pose_") or (c.startswith("AU") and c.endswith("_r"))]  # file order
    expected = window_statistics(of[cols].to_numpy(), 40)
    n = d["vision_lengths"][0]
    assert n == min(40, len(of))
    np.testing.assert_allclose(d["vision"][0, :n], expected, rtol=1e-6)


# ----------------------------------------------------------------------------- failures and options


def test_every_kind_of_broken_file(tmp_path, tiny_bert):
    root = write_synthetic_edaic(tmp_path / "b", {"train": [300, 301, 302, 303, 304], "valid": [305],
                                                  "test": [306]}, broken=["301", "302", "303", "304"])
    split = pd.read_csv(root / "labels" / "train_split.csv")
    extra = pd.DataFrame({"Participant_ID": [999, 300], "Gender": ["male"] * 2, "PHQ_Binary": [0, 0],
                          "PHQ_Score": [3, 3]})
    pd.concat([split, extra]).to_csv(root / "labels" / "train_split.csv", index=False)
    (root / "700_P").mkdir()  # a folder in no split file
    summary = convert(root, tmp_path / "b.pkl", tokenizer=tiny_bert, **SHAPES)
    assert summary.kept == {"train": 1, "valid": 1, "test": 1}
    reasons = {s.participant: (s.file, s.reason) for s in summary.skipped}
    assert reasons["301"] == ("301_P/features/301_OpenFace2.1.0_Pose_gaze_AUs.csv", "file not found")
    assert reasons["302"][0] == "302_P/features/302_OpenSMILE2.3.0_mfcc.csv"
    assert reasons["302"][1].startswith("unreadable CSV")
    assert reasons["303"][0].endswith("303_OpenFace2.1.0_Pose_gaze_AUs.csv") and "AU01_r" in reasons["303"][1]
    assert reasons["304"] == ("304_P/304_Transcript.csv", "no rows (columns: Start_Time, End_Time, Text, Confidence)")
    assert reasons["999"][0] == "999_P" and "folder not found" in reasons["999"][1]
    assert [s.reason for s in summary.skipped if s.participant == "300"] == ["already listed in split 'train'"]
    assert summary.unlisted == ["700"] and "700" in str(summary)
    assert all(s.split == "train" for s in summary.skipped)


def test_empty_split_raises_naming_it(tmp_path, tiny_bert):
    root = write_synthetic_edaic(tmp_path / "e", {"train": [300], "valid": [301, 302], "test": [303]},
                                 broken=["301", "302"])
    out = tmp_path / "e.pkl"
    with pytest.raises(ValueError, match=r"split 'valid' has no usable participant.*301: file not found"):
        convert(root, out, tokenizer=tiny_bert, **SHAPES)
    assert not out.exists() and list(tmp_path.glob("*.tmp")) == []


def test_missing_score_column_raises(tmp_path, tiny_bert):
    root = write_synthetic_edaic(tmp_path / "s", {"train": [300], "valid": [301], "test": [302]})
    pd.DataFrame({"Participant_ID": [302], "Gender": ["male"]}).to_csv(root / "labels" / "test_split.csv",
                                                                       index=False)
    with pytest.raises(ValueError, match=r"'test'.*PHQ_Score"):
        convert(root, tmp_path / "s.pkl", tokenizer=tiny_bert, **SHAPES)


def test_overwrite_refused(converted, corpus, tiny_bert):
    summary, _ = converted
    before = summary.path.read_bytes()
    with pytest.raises(FileExistsError, match=r"avec2019\.pkl"):
        convert(corpus, summary.path, tokenizer=tiny_bert, **SHAPES)
    assert summary.path.read_bytes() == before
    again = convert(corpus, summary.path, tokenizer=tiny_bert, overwrite=True, **{**SHAPES, "audio_frames": 20})
    assert again.seq_lens == (32, 20, 40) and check_feature_file(summary.path).audio_shape == (20, AUDIO_DIM)
    assert list(summary.path.parent.glob("*.tmp")) == []
    convert(corpus, summary.path, tokenizer=tiny_bert, overwrite=True, **SHAPES)  # restore for other tests


def test_layout_overrides(tmp_path, tiny_bert):
    root = write_synthetic_edaic(tmp_path / "corpus", {"train": [300, 301], "valid": [302], "test": [303]})
    # participant folders one level down, other transcript and split names, a differently cased file
    (root / "data").mkdir()
    for pid in (300, 301, 302, 303):
        folder = root / f"{pid}_P"
        (folder / f"{pid}_Transcript.csv").rename(folder / f"{pid}_TRANSCRIPT_asr.csv")
        shutil.move(folder, root / "data" / folder.name)
    of = root / "data" / "300_P" / "features" / "300_OpenFace2.1.0_Pose_gaze_AUs.csv"
    of.rename(of.with_name("300_OpenFace2.1.0_Pose_Gaze_AUs.csv"))
    shutil.move(root / "labels", root / "splits")
    splits = {"train": "splits/train_split.csv", "valid": "splits/dev_split.csv", "test": "splits/test_split.csv"}
    with pytest.raises(ValueError, match="split file for 'train' not found"):
        convert(root, tmp_path / "x.pkl", tokenizer=tiny_bert, **SHAPES)
    summary = convert(root, tmp_path / "x.pkl", tokenizer=tiny_bert, **SHAPES,
                      layout=Layout(splits=splits, transcript="{id}_TRANSCRIPT_asr.csv"))
    assert summary.kept == {"train": 2, "valid": 1, "test": 1} and summary.skipped == []
    # default transcript name: every participant is reported, naming the file it looked for
    with pytest.raises(ValueError, match="300: file not found"):
        convert(root, tmp_path / "y.pkl", tokenizer=tiny_bert, layout=Layout(splits=splits), **SHAPES)
    # gaze, other statistics, other label columns
    for name in ("train", "dev"):
        path = root / "splits" / f"{name}_split.csv"
        df = pd.read_csv(path).rename(columns={"Participant_ID": "pid", "PHQ_Score": "phq8"})
        df.drop(columns=["PHQ_Binary"]).to_csv(path, index=False)
    df = pd.read_csv(root / "splits" / "test_split.csv").rename(columns={"Participant_ID": "pid", "PHQ_Score": "phq8"})
    df.assign(PHQ_Binary=1).to_csv(root / "splits" / "test_split.csv", index=False)  # binary column wins
    layout = Layout(splits=splits, transcript="{id}_TRANSCRIPT_asr.csv", id_column="pid", score_column="phq8")
    summary = convert(root, tmp_path / "z.pkl", tokenizer=tiny_bert, layout=layout, include_gaze=True,
                      window_stats=("mean", "max", "min"), **SHAPES)
    assert summary.feature_dims == (16, 3 * 39, 3 * (17 + 6 + 8))
    report = check_feature_file(summary.path)
    assert report.vision_shape == (40, 3 * 31)
    with open(summary.path, "rb") as f:
        data = pickle.load(f)
    assert data["test"]["classification_labels"].tolist() == [1.0]
    y = data["train"]["regression_labels"]
    assert np.array_equal(data["train"]["classification_labels"], (y >= 10).astype(np.float32))


def test_speaker_column_filters_rows(tmp_path, tiny_bert):
    root = write_synthetic_edaic(tmp_path / "sp", {"train": [300], "valid": [301], "test": [302]})
    for pid in (300, 301, 302):
        pd.DataFrame({"Start_Time": [0.0, 1.0, 2.0], "Text": ["how are you", "i am fine", "why"],
                      "speaker": ["Ellie", "Participant", "Ellie"]}).to_csv(
            root / f"{pid}_P" / f"{pid}_Transcript.csv", index=False)
    summary = convert(root, tmp_path / "sp.pkl", tokenizer=tiny_bert, layout=Layout(speaker_column="speaker"),
                      **SHAPES)
    with open(summary.path, "rb") as f:
        assert pickle.load(f)["train"]["raw_text"].tolist() == ["i am fine"]
    summary = convert(root, tmp_path / "all.pkl", tokenizer=tiny_bert, **SHAPES)  # E-DAIC default: every row
    with open(summary.path, "rb") as f:
        assert pickle.load(f)["train"]["raw_text"].tolist() == ["how are you i am fine why"]


def test_bad_arguments(tmp_path, tiny_bert, corpus):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert(tmp_path / "nowhere", tmp_path / "o.pkl", tokenizer=tiny_bert)
    with pytest.raises(ValueError, match="window_stats"):
        convert(corpus, tmp_path / "o.pkl", tokenizer=tiny_bert, window_stats=("median",))
    with pytest.raises(ValueError, match="Layout.splits"):
        convert(corpus, tmp_path / "o.pkl", tokenizer=tiny_bert, layout=Layout(splits={"train": "x"}))
    with pytest.raises(ValueError, match="participants keys"):
        write_synthetic_edaic(tmp_path / "w", {"dev": [1]})
    assert avec2019.BROKEN_KINDS[0] == "missing_openface"
