"""Small synthetic datasets in MMSA's exact ``.pkl`` format, plus tiny local BERT encoders.

Nothing here touches the network, so tests, the demo and the benchmarks can exercise the full
MMSA pipeline (``MMSA.data_loader.MMDataLoader`` -> model -> metrics) offline:

    >>> from mmsa_emt import synthetic
    >>> bert = synthetic.write_tiny_bert("runs/tiny_bert")  # config.json, weights, vocab.txt
    >>> synthetic.write_dataset("runs/mosi.pkl", "mosi", tokenizer=bert, scale=0.05)

``write_tiny_bert`` saves a randomly initialised ``BertModel`` with a bert-base-uncased style
WordPiece vocab (``[PAD]``=0, ``[UNK]``=100, ``[CLS]``=101, ``[SEP]``=102, ``[MASK]``=103) that
covers every word the sentence templates use; pass bert-base sizes for realistic benchmarks.

``make_dataset`` mirrors the feature files MMSA ships for MOSI, MOSEI and SIMS (keys, shapes,
dtypes, label ranges, split sizes). Each sample is a real English sentence built from templates
("i thought the acting was really good"); its regression label comes from the polarity and
intensity of the chosen words plus a little noise, so text alone predicts it well. Audio and
vision carry a weaker, noisier share of the same signal: over each sample's valid frames the
first ``signal_channels(dim)`` channels are ``signal * label / max_label`` plus noise, all other
channels are pure noise, and frames past ``*_lengths`` are exactly zero. Everything is
deterministic given ``seed``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "INTENSIFIERS", "PRESETS", "SENTIMENT_WORDS", "Preset", "get_preset", "make_dataset",
    "make_sentences", "signal_channels", "template_words", "tokenizer_vocab", "write_dataset",
    "write_tiny_bert",
]

# -----------------------------------------------------------------------------
# presets: shapes and sizes of MMSA's real feature files (per sample)


@dataclass(frozen=True)
class Preset:
    """Shapes, split sizes and label range of one MMSA dataset."""

    name: str
    text_len: int  # BERT tokens, text_bert is (3, text_len)
    audio_len: int
    audio_dim: int
    vision_len: int
    vision_dim: int
    splits: tuple[int, int, int]  # train / valid / test at scale 1.0
    label_range: tuple[float, float]
    label_step: float  # annotations are averages, so labels sit on a grid
    unimodal_labels: bool = False  # SIMS also has regression_labels_T / _A / _V
    text_dim: int = 768  # width of the non-BERT 'text' features

    @property
    def feature_dims(self) -> list[int]:
        """``[text, audio, vision]`` feature widths as MMSA configs list them."""
        return [self.text_dim, self.audio_dim, self.vision_dim]


PRESETS: dict[str, Preset] = {
    "mosi": Preset("mosi", 50, 375, 5, 500, 20, (1284, 229, 686), (-3.0, 3.0), 0.2),
    "mosei": Preset("mosei", 50, 500, 74, 500, 35, (16326, 1871, 4659), (-3.0, 3.0), 1 / 3),
    "sims": Preset("sims", 39, 400, 33, 55, 709, (1368, 456, 457), (-1.0, 1.0), 0.2, True),
}
SPLITS = ("train", "valid", "test")


def get_preset(name: str) -> Preset:
    """Looks up a preset by name (case-insensitive); raises ValueError listing the known ones."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


def signal_channels(dim: int) -> int:
    """Number of leading audio/vision channels that carry the label signal (1..8)."""
    return min(8, max(1, dim // 8))


# -----------------------------------------------------------------------------
# sentences: templates + sentiment words; the label is carried by meaning (no negation)

SENTIMENT_WORDS: dict[str, float] = {  # polarity in [-1, 1]
    "excellent": 1.0, "amazing": 1.0, "brilliant": 1.0, "fantastic": 1.0, "wonderful": 0.9,
    "great": 0.8, "beautiful": 0.8, "enjoyable": 0.6, "good": 0.6, "funny": 0.5, "nice": 0.5,
    "interesting": 0.4, "decent": 0.3, "fine": 0.2, "okay": 0.0, "average": 0.0,
    "ordinary": -0.1, "predictable": -0.3, "slow": -0.3, "weak": -0.4, "dull": -0.5,
    "boring": -0.6, "bad": -0.6, "disappointing": -0.6, "annoying": -0.7, "poor": -0.7,
    "painful": -0.9, "terrible": -1.0, "awful": -1.0, "horrible": -1.0,
}
INTENSIFIERS: dict[str, float] = {  # multiplies the polarity
    "": 1.0, "really": 1.3, "very": 1.3, "so": 1.3, "quite": 1.1, "pretty": 1.1,
    "extremely": 1.5, "incredibly": 1.5, "absolutely": 1.5, "somewhat": 0.7, "slightly": 0.5,
    "kind of": 0.6, "a bit": 0.6,
}
MAX_SCORE = 1.5  # max |polarity * intensity|
SUBJECTS = (
    "the movie", "the film", "the acting", "the story", "the plot", "the ending", "the music",
    "the dialogue", "the cast", "the soundtrack", "the script", "the director",
    "the main character", "this scene", "the camera work",
)
CLAUSES = (
    "{s} was {a}", "i thought {s} was {a}", "honestly {s} was {a}", "i found {s} {a}",
    "overall {s} is {a}", "{s} felt {a} to me", "in my opinion {s} was {a}",
    "i have to say {s} was {a}", "to be honest {s} is {a}", "i think {s} is {a}",
)
FILLERS = ("", "", "", "um", "uh", "well", "you know", "so yeah")
JOINERS = ("and", "and also", "and i think")
ENDINGS = ("", ".", ".", "!", "...")
PUNCTUATION = tuple(".,!?;:'\"-()/&$%")


def template_words() -> list[str]:
    """Every word the sentence templates can produce, sorted."""
    parts = [*SENTIMENT_WORDS, *INTENSIFIERS, *SUBJECTS, *FILLERS, *JOINERS]
    parts += [c.format(s="", a="") for c in CLAUSES]
    return sorted({w for p in parts for w in p.split()})


def make_sentences(n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Draws ``n`` sentences and their sentiment scores in [-1, 1] (mean over clauses)."""
    adjs, pols = list(SENTIMENT_WORDS), np.array(list(SENTIMENT_WORDS.values()))
    ints, mults = list(INTENSIFIERS), np.array(list(INTENSIFIERS.values()))
    sentences, scores = [], np.empty(n)
    for i in range(n):
        clauses, clause_scores = [], []
        for _ in range(1 + (rng.random() < 0.3)):  # 30% get a second clause
            a, k = rng.integers(len(adjs)), rng.integers(len(ints))
            phrase = f"{ints[k]} {adjs[a]}".strip()
            clause = CLAUSES[rng.integers(len(CLAUSES))]
            clauses.append(clause.format(s=SUBJECTS[rng.integers(len(SUBJECTS))], a=phrase))
            clause_scores.append(pols[a] * mults[k] / MAX_SCORE)
        text = f" {JOINERS[rng.integers(len(JOINERS))]} ".join(clauses)
        text = f"{FILLERS[rng.integers(len(FILLERS))]} {text}".strip()
        sentences.append(text + ENDINGS[rng.integers(len(ENDINGS))])
        scores[i] = np.mean(clause_scores)
    return sentences, scores


# -----------------------------------------------------------------------------
# tiny BERT

SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def tokenizer_vocab(words: Sequence[str] = ()) -> list[str]:
    """bert-base-uncased style vocab: specials at 0/100-103, ``[unusedK]`` for ids 1..99,
    then punctuation, single characters (plain and ``##``) and the words, lower-cased."""
    vocab = [SPECIALS.get(i, f"[unused{i - 1}]") for i in range(104)]
    chars = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    extra = [*PUNCTUATION, *chars, *(f"##{c}" for c in chars), *template_words()]
    extra += [w.strip().lower() for w in words]
    seen = set(vocab)
    for tok in extra:
        if tok and tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    return vocab


def write_tiny_bert(
    folder: str | Path, *, words: Sequence[str] = (), hidden_size: int = 32,
    num_hidden_layers: int = 1, num_attention_heads: int = 2, intermediate_size: int = 64,
    max_position_embeddings: int = 128, seed: int = 0,
) -> Path:
    """Saves a randomly initialised BertModel plus vocab.txt that load offline.

    Args:
        folder: Output directory (created). ``BertModel.from_pretrained(folder)``,
            ``BertTokenizer.from_pretrained(folder)`` and ``AutoTokenizer`` all work on it.
        words: Extra words for the vocab, besides everything the sentence templates need.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
            max_position_embeddings: ``BertConfig`` sizes (bert-base: 768, 12, 12, 3072, 512).
        seed: Torch seed for the weights; the caller's global RNG state is left untouched.

    Returns:
        The folder as a Path.
    """
    import torch
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer_vocab(words)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in tests and demos
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                  "model_max_length": max_position_embeddings}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n",
                                                  encoding="utf-8")
    return folder


# -----------------------------------------------------------------------------
# datasets


def _load_tokenizer(tokenizer: Any) -> Any:
    """Returns ``tokenizer``, or a BertTokenizer loaded from it when it is a folder path."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import BertTokenizer
        return BertTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _token_features(ids: np.ndarray, mask: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Fixed random embedding per token id (independent of the other ids), zeros on padding."""
    uniq = np.unique(ids)
    rows = [np.random.default_rng([seed, 7, int(i)]).standard_normal(dim, dtype=np.float32)
            for i in uniq]
    table = np.stack(rows)
    feats = table[np.searchsorted(uniq, ids)]
    feats[mask == 0] = 0
    return feats


def _sequence(rng: np.random.Generator, z: np.ndarray, t: int, d: int, signal: float
              ) -> tuple[np.ndarray, list[int]]:
    """(N, t, d) noise with ``signal * z`` in the leading channels, zero past each length."""
    n = len(z)
    lengths = rng.integers(max(1, t // 3), t + 1, size=n)
    x = rng.standard_normal((n, t, d), dtype=np.float32)
    k = signal_channels(d)
    shift = signal * z + 0.25 * rng.standard_normal(n)  # per-sample offset, not averaged away
    x[:, :, :k] += shift.astype(np.float32)[:, None, None]
    x[np.arange(t)[None, :] >= lengths[:, None]] = 0
    return x, [int(v) for v in lengths]


def _round_labels(y: np.ndarray, p: Preset) -> np.ndarray:
    lo, hi = p.label_range
    return np.clip(np.round(y / p.label_step) * p.label_step, lo, hi)


def make_dataset(
    preset: str = "mosi", *, tokenizer: Any, scale: float = 1.0, seed: int = 0,
    text_len: int | None = None, audio_len: int | None = None, vision_len: int | None = None,
    text_feature_dim: int | None = None, signal_audio: float = 0.5, signal_vision: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Builds an MMSA feature dict ``{'train': {...}, 'valid': {...}, 'test': {...}}``.

    Args:
        preset: 'mosi', 'mosei' or 'sims' (see ``PRESETS``).
        tokenizer: A HF BERT tokenizer, or a folder with vocab.txt (e.g. from write_tiny_bert).
        scale: Multiplies the split sizes (at least 8 samples per split).
        seed: Seed for everything; same seed, same arrays.
        text_len, audio_len, vision_len: Override the preset's sequence lengths.
        text_feature_dim: Width of the non-BERT 'text' features (default 768).
        signal_audio, signal_vision: Strength of the label signal in audio / vision (0 = none).

    Returns:
        Per split: text_bert (N, 3, L) ids/mask/segments, text (N, L, D), audio (N, Ta, Da),
        vision (N, Tv, Dv), audio_lengths / vision_lengths (lists of int), regression_labels,
        classification_labels (0 neg, 1 neu, 2 pos), raw_text, id; SIMS adds
        regression_labels_T / _A / _V. Arrays are float32 except raw_text and id (str).
    """
    p = get_preset(preset)
    tok = _load_tokenizer(tokenizer)
    lt, ta, tv = text_len or p.text_len, audio_len or p.audio_len, vision_len or p.vision_len
    dim = text_feature_dim or p.text_dim
    if lt < 2 or ta < 1 or tv < 1 or dim < 1 or scale <= 0:
        raise ValueError("need text_len >= 2, audio/vision_len >= 1, text_feature_dim >= 1, "
                         "scale > 0")
    sizes = [max(8, round(n * scale)) for n in p.splits]
    width, offset, hi = max(4, len(str(sum(sizes) - 1))), 0, p.label_range[1]
    data = {}
    for split_idx, (split, n) in enumerate(zip(SPLITS, sizes)):
        rng = np.random.default_rng([seed, split_idx])
        sentences, scores = make_sentences(n, rng)
        y = _round_labels(scores * hi + rng.normal(0.0, 0.1 * hi, n), p)
        enc = tok(sentences, max_length=lt, truncation=True, padding="max_length",
                  return_attention_mask=True, return_token_type_ids=True)
        ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
        segments = np.asarray(enc["token_type_ids"])
        z = y / hi
        audio, audio_lengths = _sequence(rng, z, ta, p.audio_dim, signal_audio)
        vision, vision_lengths = _sequence(rng, z, tv, p.vision_dim, signal_vision)
        d = {
            "raw_text": np.array(sentences),
            "id": np.array([f"synthetic_{p.name}$_${offset + i:0{width}d}" for i in range(n)]),
            "text_bert": np.stack([ids, mask, segments], axis=1).astype(np.float32),
            "text": _token_features(ids, mask, dim, seed),
            "audio": audio, "audio_lengths": audio_lengths,
            "vision": vision, "vision_lengths": vision_lengths,
            "regression_labels": y.astype(np.float32),
            "classification_labels": (np.sign(y) + 1).astype(np.float32),
        }
        if p.unimodal_labels:
            for m in "TAV":
                noisy = _round_labels(y + rng.normal(0.0, 0.2 * hi, n), p)
                d[f"regression_labels_{m}"] = noisy.astype(np.float32)
        data[split] = d
        offset += n
    return data


def write_dataset(path: str | Path, preset: str = "mosi", *, overwrite: bool = False,
                  **kwargs: Any) -> Path:
    """Pickles ``make_dataset(preset, **kwargs)`` to ``path`` (protocol 4), making parent dirs.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    data = make_dataset(preset, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb" if overwrite else "xb") as f:
        pickle.dump(data, f, protocol=4)
    return path
