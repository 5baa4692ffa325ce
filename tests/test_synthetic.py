"""Tests for mmsa_emt.synthetic: tiny BERT folders and MMSA-format synthetic datasets."""

import pickle
import re

import numpy as np
import pytest
import torch
from easydict import EasyDict
from transformers import AutoTokenizer, BertModel, BertTokenizer

from mmsa_emt import synthetic
from mmsa_emt.synthetic import PRESETS, make_dataset, write_dataset, write_tiny_bert

TINY = {"scale": 0.02, "text_len": 16, "audio_len": 12, "vision_len": 10, "text_feature_dim": 8}
KEYS = {"text_bert", "text", "audio", "vision", "audio_lengths", "vision_lengths",
        "regression_labels", "classification_labels", "raw_text", "id"}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny", words=["Zebra", "quokka"])


@pytest.fixture(scope="module")
def tok(bert_dir):
    return BertTokenizer.from_pretrained(str(bert_dir))


@pytest.fixture(scope="module")
def mosi(tok):
    return make_dataset("mosi", tokenizer=tok, seed=0, **TINY)


@pytest.fixture(scope="module")
def sims(tok):
    return make_dataset("sims", tokenizer=tok, seed=0, **TINY)


def _state(folder):
    return BertModel.from_pretrained(str(folder)).state_dict()


# ----------------------------------------------------------------------------- tiny BERT


def test_tiny_bert_loads_offline(bert_dir):
    model = BertModel.from_pretrained(str(bert_dir))
    auto = AutoTokenizer.from_pretrained(str(bert_dir))
    slow = BertTokenizer.from_pretrained(str(bert_dir))
    for t in (auto, slow):
        specials = [t.pad_token_id, t.unk_token_id, t.cls_token_id, t.sep_token_id, t.mask_token_id]
        assert specials == [0, 100, 101, 102, 103]
        assert len(t) == model.config.vocab_size
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    vocab = (bert_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(vocab) == model.config.vocab_size
    assert vocab[1] == "[unused0]" and vocab[99] == "[unused98]" and vocab[104] != "[unused99]"
    assert "zebra" in vocab and "quokka" in vocab  # extra words, lower-cased
    enc = auto("I thought the acting was REALLY good!", return_tensors="pt")
    assert 100 not in enc["input_ids"][0].tolist()
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert out.shape == (1, enc["input_ids"].shape[1], 32) and torch.isfinite(out).all()


def test_tiny_bert_seeded(tmp_path):
    rng_state = torch.get_rng_state()
    a, b, c = (write_tiny_bert(tmp_path / n, seed=s) for n, s in [("a", 3), ("b", 3), ("c", 4)])
    assert torch.equal(torch.get_rng_state(), rng_state)  # caller's RNG untouched
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(sa[key], sc[key])


def test_template_words_tokenize_without_unk(tok, mosi):
    ids = tok(synthetic.template_words(), add_special_tokens=False)["input_ids"]
    assert all(len(i) == 1 and i[0] >= 104 for i in ids)  # each template word is one vocab entry
    for sentence in mosi["train"]["raw_text"]:
        ids = tok(str(sentence))["input_ids"]
        assert 100 not in ids and max(ids) < len(tok)


def test_unknown_preset_lists_known(tok):
    with pytest.raises(ValueError, match=r"mosei.*mosi.*sims"):
        make_dataset("iemocap", tokenizer=tok)
    with pytest.raises(ValueError, match="mosi"):
        synthetic.get_preset("nope")
    assert set(PRESETS) == {"mosi", "mosei", "sims"}


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", ["mosi", "mosei", "sims"])
def test_split_keys_shapes_dtypes(tok, name):
    p = PRESETS[name]
    data = make_dataset(name, tokenizer=tok, scale=0.002, audio_len=7, vision_len=5,
                        text_feature_dim=4)
    assert set(data) == {"train", "valid", "test"}
    ids = []
    for split, full in zip(("train", "valid", "test"), p.splits):
        d = data[split]
        n = len(d["regression_labels"])
        assert n == max(8, round(full * 0.002))
        extra = {f"regression_labels_{m}" for m in "TAV"} if p.unimodal_labels else set()
        assert set(d) == KEYS | extra
        assert d["text_bert"].shape == (n, 3, p.text_len)
        assert d["text"].shape == (n, p.text_len, 4)
        assert d["audio"].shape == (n, 7, p.audio_dim) and d["vision"].shape == (n, 5, p.vision_dim)
        for k in ("text_bert", "text", "audio", "vision", "regression_labels",
                  "classification_labels"):
            assert d[k].dtype == np.float32, k
        for k in ("audio_lengths", "vision_lengths"):
            assert isinstance(d[k], list) and len(d[k]) == n and all(type(v) is int for v in d[k])
        assert d["raw_text"].shape == d["id"].shape == (n,)
        assert all(isinstance(s, str) for s in [*d["raw_text"], *d["id"]])
        assert all(re.fullmatch(rf"synthetic_{name}\$_\$\d{{4,}}", s) for s in d["id"])
        ids += list(d["id"])
    assert len(set(ids)) == len(ids)


def test_full_scale_split_sizes(tok):
    data = make_dataset("mosi", tokenizer=tok, text_len=8, audio_len=2, vision_len=2,
                        text_feature_dim=2)
    assert [len(data[s]["id"]) for s in ("train", "valid", "test")] == [1284, 229, 686]


def test_text_bert_layout(tok, mosi):
    for d in mosi.values():
        ids, mask, seg = d["text_bert"][:, 0], d["text_bert"][:, 1], d["text_bert"][:, 2]
        lengths = mask.sum(1).astype(int)
        pos = np.arange(mask.shape[1])[None]
        assert np.array_equal(mask, (pos < lengths[:, None]).astype(np.float32))
        assert (ids[:, 0] == 101).all()
        assert (ids[np.arange(len(ids)), lengths - 1] == 102).all()
        assert (ids[mask == 0] == 0).all() and (seg == 0).all()
        assert ((ids != 102) | (pos == (lengths - 1)[:, None])).all()  # a single [SEP]
        # 'text' features: zeros on padding, one fixed vector per token id
        text = d["text"]
        assert (text[mask == 0] == 0).all() and (np.abs(text[mask == 1]).sum(-1) > 0).all()
        flat_ids, flat = ids[mask == 1], text[mask == 1]
        for i in np.unique(flat_ids)[:20]:
            rows = flat[flat_ids == i]
            assert np.array_equal(rows, np.broadcast_to(rows[0], rows.shape))


def test_truncation_keeps_sep(tok):
    d = make_dataset("mosi", tokenizer=tok, scale=0.01, text_len=6, audio_len=3, vision_len=3,
                     text_feature_dim=2)["train"]
    ids, mask = d["text_bert"][:, 0], d["text_bert"][:, 1]
    assert (mask == 1).all()  # every template sentence has > 4 word pieces
    assert (ids[:, 0] == 101).all() and (ids[:, -1] == 102).all()


@pytest.mark.parametrize("fixture", ["mosi", "sims"])
def test_lengths_and_zero_padding(fixture, request):
    data = request.getfixturevalue(fixture)
    for d in data.values():
        for m in ("audio", "vision"):
            x, lengths = d[m], np.array(d[f"{m}_lengths"])
            t = x.shape[1]
            assert lengths.min() >= 1 and lengths.max() <= t
            valid = np.arange(t)[None] < lengths[:, None]
            assert (x[~valid] == 0).all() and (np.abs(x[valid]).sum(-1) > 0).all()
        assert len(set(d["audio_lengths"])) > 1  # lengths vary


@pytest.mark.parametrize("fixture,lo,hi", [("mosi", -3, 3), ("sims", -1, 1)])
def test_labels(fixture, lo, hi, request):
    data = request.getfixturevalue(fixture)
    keys = ["regression_labels"] + ([f"regression_labels_{m}" for m in "TAV"]
                                    if fixture == "sims" else [])
    for d in data.values():
        for k in keys:
            y = d[k]
            assert y.dtype == np.float32 and y.shape == d["regression_labels"].shape
            assert (y >= lo).all() and (y <= hi).all()
        y = d["regression_labels"]
        assert np.array_equal(d["classification_labels"], np.where(y < 0, 0, np.where(y > 0, 2, 1)))
    y = np.concatenate([d["regression_labels"] for d in data.values()])
    assert y.min() < 0 < y.max() and y.std() > 0.2 * hi
    if fixture == "sims":  # unimodal labels are noisy copies, not identical
        tr = data["train"]
        for m in "TAV":
            assert not np.array_equal(tr[f"regression_labels_{m}"], tr["regression_labels"])
            assert np.corrcoef(tr[f"regression_labels_{m}"], tr["regression_labels"])[0, 1] > 0.5


def test_deterministic(tok, mosi):
    again = make_dataset("mosi", tokenizer=tok, seed=0, **TINY)
    other = make_dataset("mosi", tokenizer=tok, seed=1, **TINY)
    for split in mosi:
        for k, v in mosi[split].items():
            assert np.array_equal(np.asarray(v), np.asarray(again[split][k])), k
        for k in ("audio", "vision", "text_bert", "raw_text"):
            assert not np.array_equal(mosi[split][k], other[split][k]), k


# ----------------------------------------------------------------------------- signal


def test_planted_signal(tok):
    data = make_dataset("mosi", tokenizer=tok, scale=0.2, seed=5, text_len=24, audio_len=12,
                        vision_len=10, text_feature_dim=2)
    d = data["train"]
    y = d["regression_labels"]
    for m in ("audio", "vision"):
        x, lengths = d[m], np.array(d[f"{m}_lengths"])
        assert np.corrcoef(x[:, :, 0].sum(1) / lengths, y)[0, 1] > 0.3, m
        noise_ch = x.shape[2] - 1  # past the signal channels
        assert abs(np.corrcoef(x[:, :, noise_ch].sum(1) / lengths, y)[0, 1]) < 0.3, m
    words = synthetic.SENTIMENT_WORDS
    score = [np.mean([words[w] for w in re.findall(r"[a-z]+", s) if w in words])
             for s in d["raw_text"]]
    assert np.corrcoef(score, y)[0, 1] > 0.8
    quiet = make_dataset("mosi", tokenizer=tok, scale=0.2, seed=5, text_len=24, audio_len=12,
                         vision_len=10, text_feature_dim=2, signal_audio=0.0)["train"]
    lengths = np.array(quiet["audio_lengths"])
    assert abs(np.corrcoef(quiet["audio"][:, :, 0].sum(1) / lengths, y)[0, 1]) < 0.3


# ----------------------------------------------------------------------------- files and MMSA


def test_write_dataset_roundtrip(tmp_path, bert_dir, mosi):
    path = tmp_path / "a" / "b" / "mosi.pkl"
    assert write_dataset(path, "mosi", tokenizer=str(bert_dir), seed=0, **TINY) == path
    with open(path, "rb") as f:
        loaded = pickle.load(f)
    for split in mosi:
        for k, v in mosi[split].items():
            assert np.array_equal(np.asarray(v), np.asarray(loaded[split][k])), k
    with pytest.raises(FileExistsError, match=r"mosi\.pkl"):
        write_dataset(path, "mosi", tokenizer=str(bert_dir), seed=1, **TINY)
    write_dataset(path, "mosi", tokenizer=str(bert_dir), seed=1, overwrite=True, **TINY)
    with open(path, "rb") as f:
        assert not np.array_equal(pickle.load(f)["train"]["audio"], mosi["train"]["audio"])


@pytest.mark.parametrize("name,dims", [("mosi", [768, 5, 20]), ("sims", [768, 33, 709])])
def test_mmsa_data_loader_accepts_file(tmp_path, tok, name, dims):
    from MMSA.data_loader import MMDataLoader

    path = write_dataset(tmp_path / f"{name}.pkl", name, tokenizer=tok, **TINY)
    args = EasyDict(
        dataset_name=name, featurePath=str(path), use_bert=True, need_data_aligned=False,
        feature_dims=list(dims), seq_lens=[50, 50, 50], batch_size=4, custom_feature=None,
        feature_T=None, feature_A=None, feature_V=None, data_missing=True,
        missing_rate=[0.5, 0.5, 0.5], missing_seed=[111, 1111, 11111], need_normalized=False,
    )
    loaders = MMDataLoader(args, num_workers=0)
    batch = next(iter(loaders["train"]))
    for k in ("text", "text_m", "audio", "audio_m", "vision_m", "audio_lengths", "vision_lengths",
              "labels"):
        assert k in batch, k
    assert batch["text"].shape == (4, 3, TINY["text_len"])
    assert batch["audio"].shape == (4, 12, dims[1])
    assert batch["vision"].shape == (4, 10, dims[2])
    assert set(batch["labels"]) == ({"M", "T", "A", "V"} if name == "sims" else {"M"})
    assert list(args.seq_lens) == [TINY["text_len"], 12, 10]
    with open(path, "rb") as f:
        assert len(loaders["test"].dataset) == len(pickle.load(f)["test"]["id"])
