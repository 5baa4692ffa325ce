"""AVEC2019 DDS (E-DAIC) -> one MMSA feature file (``.pkl``).

The Detecting Depression Sub-challenge of AVEC2019 uses E-DAIC (the Extended DAIC-WOZ): 275 clinical
interviews (163 train / 56 dev / 56 test) labelled with the participant's PHQ-8 score (0-24).
:func:`convert` turns the corpus as distributed into the pickled dict MMSA's ``MMDataLoader`` reads
(``{'train', 'valid', 'test'}``; E-DAIC's *dev* split becomes ``'valid'``), one sample per interview:

* ``regression_labels``: the PHQ-8 score; ``classification_labels``: ``PHQ_Binary`` where the split
  file has it, else ``score >= 10``; ``id``: ``'avec2019$_$<participant>'``.
* **text** - an interview is far longer than a BERT input, so only part of it can be kept. Policy:
  every non-empty transcript row is an utterance; rows are put in time order (``Start_Time``) and
  each one is tokenised on its own (wordpieces, no special tokens). If all of them fit into
  ``text_len - 2`` wordpieces they are all kept; otherwise the largest number ``k`` of *evenly
  spaced* utterances that fits is kept - the interview is cut into ``k`` equal runs of utterances
  and the middle utterance of each run is taken - so the kept text samples the whole interview
  (beginning, middle and end) with whole utterances instead of only its opening small talk. The
  kept utterances, still in time order, become ``[CLS] ... [SEP]`` (``text_bert``), and their text,
  joined by spaces, is ``raw_text``. Only if not even one utterance fits (a single row longer than
  the budget) is the middle utterance cut to the budget. E-DAIC's transcripts (automatic speech
  recognition; columns ``Start_Time, End_Time, Text, Confidence``) carry *no speaker column*, so
  by default every row is used; with diarised transcripts set ``Layout.speaker_column`` and only
  the rows of ``Layout.participant_speakers`` are kept. ``text`` (for non-BERT models) holds a
  fixed random vector per token id, as in :mod:`mmsa_emt.synthetic`.
* **audio** - the openSMILE MFCC frames (``<id>_OpenSMILE2.3.0_mfcc.csv``; ``name``/``frameTime``
  dropped, 39 coefficients: MFCC 0-12 + deltas + accelerations at 100 frames/s).
* **vision** - OpenFace 2.1 action-unit intensities (``AU*_r``) and head pose (``pose_T*``,
  ``pose_R*``), plus gaze with ``include_gaze=True``, from ``<id>_OpenFace2.1.0_Pose_gaze_AUs.csv``
  (30 frames/s). Frames where OpenFace lost the face (``success == 0``) are *dropped*, not zeroed:
  zeros would sit far from real values (head position is in millimetres) and swamp the statistics.
* **long sequences** - an interview has ~10^5 MFCC frames, so audio and vision are reduced by
  *windowed statistics* (:func:`window_statistics`): the frames are split into
  ``min(frames, T)`` contiguous windows of (almost) equal length, as ``numpy.array_split`` does,
  and each window becomes the concatenation of its per-feature statistics (default mean and
  population std, so the feature width doubles). ``*_lengths`` is the number of windows; rows past
  it are zero. Non-finite values (in the frames and in the result) become 0.

A participant whose files are missing or broken (file not found, unreadable CSV, missing columns,
no rows) or who is listed in a split file but has no folder on disk is reported as
:class:`Skipped` in the returned :class:`ConversionSummary` and left out; one bad participant never
stops the build, but a split left empty raises ``ValueError``. Every file name, pattern and column
is a field of :class:`Layout`. :func:`write_synthetic_edaic` writes a tiny corpus in this layout
for tests and demos::

    >>> from mmsa_emt import avec2019, synthetic
    >>> bert = synthetic.write_tiny_bert("runs/tiny_bert")
    >>> root = avec2019.write_synthetic_edaic("runs/edaic", broken=["301"])
    >>> print(avec2019.convert(root, "runs/avec2019.pkl", tokenizer=bert))
"""

from __future__ import annotations

import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import atomic_file
from .synthetic import _load_tokenizer, _token_features

__all__ = [
    "BROKEN_KINDS", "DATASET_NAME", "SPLITS", "STATISTICS", "ConversionSummary", "Layout", "Skipped",
    "convert", "select_utterances", "window_statistics", "write_synthetic_edaic",
]

DATASET_NAME = "avec2019"
SPLITS = ("train", "valid", "test")
STATISTICS = ("mean", "std", "min", "max")


def _default_splits() -> dict[str, str]:
    return {"train": "labels/train_split.csv", "valid": "labels/dev_split.csv",
            "test": "labels/test_split.csv"}


@dataclass
class Layout:
    """Where E-DAIC keeps things; every name can be overridden.

    Paths of the per-participant files are relative to the participant folder and may use
    ``{id}``; split files are relative to the corpus root. A file that is not found under its exact
    name is also looked up case-insensitively (``Pose_Gaze`` vs ``Pose_gaze``). If
    ``participant_glob`` matches nothing at the root it is tried one level down (``data/300_P``).
    Column names are compared after stripping surrounding spaces.
    """

    participant_glob: str = "*_P"
    participant_regex: str = r"(?P<id>.+)_P"  # folder name -> participant id (group 'id')
    transcript: str = "{id}_Transcript.csv"
    mfcc: str = "features/{id}_OpenSMILE2.3.0_mfcc.csv"
    openface: str = "features/{id}_OpenFace2.1.0_Pose_gaze_AUs.csv"
    splits: dict[str, str] = field(default_factory=_default_splits)  # 'train'/'valid'/'test'
    id_column: str = "Participant_ID"
    score_column: str = "PHQ_Score"
    binary_column: str | None = "PHQ_Binary"  # used where present, else score >= binary_threshold
    binary_threshold: float = 10.0
    # transcript
    transcript_sep: str = ","
    text_column: str = "Text"
    start_column: str | None = "Start_Time"  # sort key; None or absent: file order
    speaker_column: str | None = None  # E-DAIC has none: every row is used
    participant_speakers: tuple[str, ...] = ("Participant",)
    # openSMILE MFCC
    mfcc_sep: str = ";"
    mfcc_drop: tuple[str, ...] = ("name", "frameTime", "frameIndex")
    mfcc_columns: tuple[str, ...] | None = None  # None: every column not in mfcc_drop
    # OpenFace
    openface_sep: str = ","
    success_column: str | None = "success"  # frames with 0 here are dropped; None keeps all
    vision_patterns: tuple[str, ...] = (r"AU\d+_r", r"pose_[TR][xyz]")  # full-match regexes
    gaze_patterns: tuple[str, ...] = (r"gaze_\d_[xyz]", r"gaze_angle_[xy]")  # with include_gaze


@dataclass
class Skipped:
    """A participant left out of the feature file, and why."""

    participant: str
    split: str
    file: str  # relative to the corpus root
    reason: str


@dataclass
class ConversionSummary:
    """What :func:`convert` wrote: samples kept per split, participants skipped, the output path."""

    kept: dict[str, int]
    skipped: list[Skipped]
    path: Path
    feature_dims: tuple[int, int, int] = (0, 0, 0)  # text ('text' width), audio, vision
    seq_lens: tuple[int, int, int] = (0, 0, 0)  # text_len, audio windows, vision windows
    unlisted: list[str] = field(default_factory=list)  # folders on disk in no split file

    def __str__(self) -> str:
        kept = ", ".join(f"{s} {n}" for s, n in self.kept.items())
        lines = [f"AVEC2019 (E-DAIC) feature file {self.path}",
                 f"  kept: {kept} ({sum(self.kept.values())} in all)",
                 f"  feature dims (text, audio, vision): {list(self.feature_dims)}; "
                 f"sequence lengths: {list(self.seq_lens)}"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            lines += [f"    [{s.split}] participant {s.participant}: {s.file}: {s.reason}"
                      for s in self.skipped]
        else:
            lines.append("  skipped: none")
        if self.unlisted:
            lines.append(f"  {len(self.unlisted)} folder(s) in no split file, ignored: "
                         + ", ".join(self.unlisted))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# reduction of long sequences and of long transcripts


def window_statistics(x: Any, frames: int, stats: Sequence[str] = ("mean", "std")) -> np.ndarray:
    """Reduces a (T, D) sequence to (min(frames, T), len(stats) * D) windowed statistics.

    The T frames are split into ``W = min(frames, T)`` contiguous windows whose sizes differ by at
    most one (the first ``T % W`` windows get the extra frame, exactly like ``numpy.array_split``).
    Each output row is ``[stat_1 of the D features, stat_2 of the D features, ...]`` over one
    window; ``stats`` are any of 'mean', 'std' (population, ddof=0), 'min', 'max'. Non-finite
    input values count as 0; the result is float32.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a (T, D) array with T >= 1, got shape {x.shape}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    stats = _check_stats(stats)
    x = np.where(np.isfinite(x), x, 0.0)
    t = x.shape[0]
    w = min(int(frames), t)
    sizes = np.full(w, t // w)
    sizes[: t % w] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    mean = np.add.reduceat(x, starts, axis=0) / sizes[:, None]
    out = []
    for name in stats:
        if name == "mean":
            out.append(mean)
        elif name == "std":
            dev = x - np.repeat(mean, sizes, axis=0)
            out.append(np.sqrt(np.add.reduceat(dev * dev, starts, axis=0) / sizes[:, None]))
        elif name == "min":
            out.append(np.minimum.reduceat(x, starts, axis=0))
        else:
            out.append(np.maximum.reduceat(x, starts, axis=0))
    result = np.concatenate(out, axis=1)
    return np.nan_to_num(result, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _check_stats(stats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stats, str):
        stats = (stats,)
    stats = tuple(str(s).lower() for s in stats)
    bad = [s for s in stats if s not in STATISTICS]
    if not stats or bad:
        raise ValueError(f"window_stats must be a non-empty sequence of {list(STATISTICS)}, got {list(stats)}")
    return stats


def _even_indices(n: int, k: int) -> np.ndarray:
    """The middle element of each of ``k`` equal runs of ``range(n)``."""
    return ((np.arange(k) + 0.5) * n / k).astype(np.int64)


def select_utterances(lengths: Sequence[int], budget: int) -> list[int]:
    """Indices (ascending) of the utterances to keep under a wordpiece ``budget``.

    All of them if they fit; else the largest ``k`` such that the middle utterances of ``k``
    equal runs fit; ``[]`` when not even one (the middle utterance) fits.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if lengths.sum() <= budget:
        return list(range(n))
    for k in range(min(n - 1, max(int(budget), 0)), 0, -1):  # each utterance costs >= 1 piece
        idx = _even_indices(n, k)
        if lengths[idx].sum() <= budget:
            return idx.tolist()
    return []


# --------------------------------------------------------------------------------------------
# reading one participant


class _Broken(Exception):
    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


def _find(folder: Path, rel: str) -> Path | None:
    """``folder / rel``, or a case-insensitive match of each path component; None if absent."""
    path = folder / rel
    if path.is_file():
        return path
    current = folder
    for part in Path(rel).parts:
        if not current.is_dir():
            return None
        matches = [p for p in current.iterdir() if p.name.lower() == part.lower()]
        if not matches:
            return None
        current = sorted(matches)[0]
    return current if current.is_file() else None


def _read_csv(path: Path | None, rel: str, sep: str, *, text: bool = False) -> pd.DataFrame:
    if path is None:
        raise _Broken(rel, "file not found")
    try:
        df = pd.read_csv(path, sep=sep, skipinitialspace=True, low_memory=False,
                         encoding="utf-8-sig", encoding_errors="replace" if text else "strict")
    except pd.errors.EmptyDataError:
        raise _Broken(rel, "empty file") from None
    except Exception as exc:  # ParserError, UnicodeDecodeError, OSError, ...
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise _Broken(rel, f"unreadable CSV ({type(exc).__name__}: {message})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise _Broken(rel, f"no rows (columns: {', '.join(df.columns[:8])})")
    return df


def _require(df: pd.DataFrame, columns: Sequence[str], rel: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        present = ", ".join(list(df.columns)[:10]) + (", ..." if len(df.columns) > 10 else "")
        raise _Broken(rel, f"missing column(s) {missing}; columns present: {present}")


def _numeric(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """The columns as float64; entries that are not numbers become NaN (later 0)."""
    return df[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)


def _utterances(path: Path | None, rel: str, layout: Layout) -> list[str]:
    df = _read_csv(path, rel, layout.transcript_sep, text=True)
    needed = [layout.text_column] + ([layout.speaker_column] if layout.speaker_column else [])
    _require(df, needed, rel)
    if layout.speaker_column:
        speakers = {s.strip().lower() for s in layout.participant_speakers}
        df = df[df[layout.speaker_column].astype(str).str.strip().str.lower().isin(speakers)]
    if layout.start_column and layout.start_column in df.columns:
        start = pd.to_numeric(df[layout.start_column], errors="coerce")
        df = df.assign(_start=start.fillna(np.inf)).sort_values("_start", kind="stable")
    texts = [" ".join(str(t).split()) for t in df[layout.text_column] if not pd.isna(t)]
    texts = [t for t in texts if t]
    if not texts:
        who = f" for speakers {list(layout.participant_speakers)}" if layout.speaker_column else ""
        raise _Broken(rel, f"no text{who} in column '{layout.text_column}'")
    return texts


def _tokenize(tok: Any, utterances: list[str], text_len: int) -> tuple[list[int], str]:
    """Wordpiece ids (no specials) of the kept utterances and their text; see the module doc."""
    budget = text_len - 2
    pieces = tok(utterances, add_special_tokens=False)["input_ids"]
    keep = [i for i, p in enumerate(pieces) if len(p) > 0]
    lengths = [len(pieces[i]) for i in keep]
    chosen = select_utterances(lengths, budget)
    if chosen:
        idx = [keep[i] for i in chosen]
        ids = [t for i in idx for t in pieces[i]]
        text = " ".join(utterances[i] for i in idx)
    elif keep:  # one utterance longer than the whole budget: the middle one, cut
        mid = keep[len(keep) // 2]
        ids = list(pieces[mid][:budget])
        text = tok.decode(ids) if hasattr(tok, "decode") else utterances[mid]
    else:
        ids, text = [], ""
    return ids, text


def _vision_columns(columns: Sequence[str], patterns: Sequence[str]) -> list[str]:
    regexes = [re.compile(p) for p in patterns]
    return [c for c in columns if any(r.fullmatch(c) for r in regexes)]


def _audio(path: Path | None, rel: str, layout: Layout, frames: int, stats: tuple[str, ...]
           ) -> tuple[tuple[str, ...], np.ndarray]:
    df = _read_csv(path, rel, layout.mfcc_sep)
    if layout.mfcc_columns is not None:
        cols = list(layout.mfcc_columns)
        _require(df, cols, rel)
    else:
        drop = set(layout.mfcc_drop)
        cols = [c for c in df.columns if c not in drop and not c.startswith("Unnamed:")]
        if not cols:
            raise _Broken(rel, f"no feature columns besides {sorted(drop)}")
    x = _numeric(df, cols)
    if not np.isfinite(x).any():
        raise _Broken(rel, "no numeric values in the feature columns")
    return tuple(cols), window_statistics(x, frames, stats)


def _vision(path: Path | None, rel: str, layout: Layout, frames: int, stats: tuple[str, ...],
            include_gaze: bool) -> tuple[tuple[str, ...], np.ndarray]:
    df = _read_csv(path, rel, layout.openface_sep)
    patterns = tuple(layout.vision_patterns) + (tuple(layout.gaze_patterns) if include_gaze else ())
    cols = _vision_columns(df.columns, patterns)
    if not cols:
        raise _Broken(rel, f"no column matches {list(patterns)}")
    if include_gaze and not _vision_columns(df.columns, layout.gaze_patterns):
        raise _Broken(rel, f"include_gaze=True but no column matches {list(layout.gaze_patterns)}")
    if layout.success_column:
        _require(df, [layout.success_column], rel)
        ok = pd.to_numeric(df[layout.success_column], errors="coerce").fillna(0).to_numpy() != 0
        if not ok.any():
            raise _Broken(rel, f"no frame with {layout.success_column} != 0 (face never tracked)")
        df = df[ok]
    return tuple(cols), window_statistics(_numeric(df, cols), frames, stats)


# --------------------------------------------------------------------------------------------
# split files and participant folders


def _norm_id(value: Any) -> str:
    """'300', 300, 300.0 and ' 300 ' -> '300'; other strings are stripped."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else str(value)
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _read_split(root: Path, split: str, rel: str, layout: Layout) -> pd.DataFrame:
    path = root / rel
    if not path.is_file():
        raise ValueError(f"split file for '{split}' not found: {path} (set Layout.splits)")
    try:
        df = pd.read_csv(path, skipinitialspace=True, encoding="utf-8-sig")
    except Exception as exc:
        raise ValueError(f"split file for '{split}' is unreadable: {path} ({type(exc).__name__}: {exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in (layout.id_column, layout.score_column) if c not in df.columns]
    if missing:
        raise ValueError(
            f"split file for '{split}' ({path}) has no column(s) {missing}; columns: {list(df.columns)}. "
            "A test split released without labels cannot be used for training or evaluation; point "
            "Layout.splits at a labelled file or set Layout.id_column / score_column.")
    return df


def _participant_folders(root: Path, layout: Layout) -> dict[str, Path]:
    regex = re.compile(layout.participant_regex)
    folders = [p for p in sorted(root.glob(layout.participant_glob)) if p.is_dir()]
    if not folders:
        folders = [p for p in sorted(root.glob(f"*/{layout.participant_glob}")) if p.is_dir()]
    found: dict[str, Path] = {}
    for folder in folders:
        m = regex.fullmatch(folder.name)
        if m:
            found.setdefault(_norm_id(m.group("id")), folder)
    return found


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# conversion


@dataclass
class _Sample:
    pid: str
    split: str
    ids: list[int]
    raw_text: str
    audio_cols: tuple[str, ...]
    audio: np.ndarray
    vision_cols: tuple[str, ...]
    vision: np.ndarray
    score: float
    binary: float
    files: dict[str, str]


def _reference_columns(samples: list[_Sample], attr: str, fixed: Sequence[str] | None) -> tuple[str, ...]:
    if fixed is not None:
        return tuple(fixed)
    counts = Counter(getattr(s, f"{attr}_cols") for s in samples)
    return counts.most_common(1)[0][0]  # ties: the first seen


def _select(stats_array: np.ndarray, cols: tuple[str, ...], ref: tuple[str, ...]) -> np.ndarray:
    """Re-orders the per-feature blocks of a windowed-statistics array to the reference columns."""
    if cols == ref:
        return stats_array
    w, width = stats_array.shape
    n_stats = width // len(cols)
    index = [cols.index(c) for c in ref]
    return stats_array.reshape(w, n_stats, len(cols))[:, :, index].reshape(w, n_stats * len(ref))


def _pad(arrays: list[np.ndarray], t: int, d: int) -> tuple[np.ndarray, list[int]]:
    out = np.zeros((len(arrays), t, d), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, [len(a) for a in arrays]


def convert(
    root: str | os.PathLike[str], out: str | os.PathLike[str], *, tokenizer: Any, layout: Layout | None = None,
    text_len: int = 128, audio_frames: int = 500, vision_frames: int = 500,
    window_stats: Sequence[str] = ("mean", "std"), text_feature_dim: int = 768, include_gaze: bool = False,
    overwrite: bool = False, progress: bool = True,
) -> ConversionSummary:
    """Converts an E-DAIC corpus folder into one MMSA feature file; see the module docstring.

    Args:
        root: The corpus folder (participant folders and ``labels/``, as in :class:`Layout`).
        out: The ``.pkl`` to write (parent folders are created); written to a temporary file in the
            same folder and renamed, with pickle protocol 4.
        tokenizer: A HF tokenizer with [CLS]/[SEP], or a folder with vocab.txt (BertTokenizer).
        layout: File names, patterns and columns (default: E-DAIC as distributed).
        text_len: Tokens per sample including [CLS] and [SEP] (BERT allows up to 512).
        audio_frames, vision_frames: Maximum number of windows (sequence length) per modality.
        window_stats: Statistics per window ('mean', 'std', 'min', 'max'); width = len * raw width.
        text_feature_dim: Width of the random per-token 'text' features for non-BERT models.
        include_gaze: Add OpenFace gaze directions/angles to vision.
        overwrite: Replace an existing ``out``.
        progress: tqdm bar over participants.

    Returns:
        A :class:`ConversionSummary` (print it for a readable report).

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False (checked before any work).
        FileNotFoundError: ``root`` is not a folder.
        ValueError: bad arguments, a split file missing/unreadable/without the id or score column,
            or a split with no usable participant.
    """
    from tqdm.auto import tqdm

    root, out = Path(root), Path(out)
    layout = layout or Layout()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if not root.is_dir():
        raise FileNotFoundError(f"E-DAIC root folder not found: {root}")
    if text_len < 3 or audio_frames < 1 or vision_frames < 1 or text_feature_dim < 1:
        raise ValueError("need text_len >= 3, audio_frames >= 1, vision_frames >= 1, text_feature_dim >= 1")
    stats = _check_stats(window_stats)
    if set(layout.splits) != set(SPLITS):
        raise ValueError(f"Layout.splits must have exactly the keys {list(SPLITS)}, got {list(layout.splits)}")
    tok = _load_tokenizer(tokenizer)
    cls_id, sep_id = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer needs [CLS] and [SEP] tokens (cls_token_id / sep_token_id)")
    pad_id = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0

    tables = {split: _read_split(root, split, layout.splits[split], layout) for split in SPLITS}
    folders = _participant_folders(root, layout)
    skipped: list[Skipped] = []
    samples: list[_Sample] = []
    seen: dict[str, str] = {}
    total = sum(len(t) for t in tables.values())
    bar = tqdm(total=total, desc="E-DAIC participants", unit="participant", disable=not progress)
    try:
        for split in SPLITS:
            table, split_rel = tables[split], layout.splits[split]
            has_binary = bool(layout.binary_column) and layout.binary_column in table.columns
            for _, row in table.iterrows():
                bar.update(1)
                raw_id = row[layout.id_column]
                if pd.isna(raw_id):
                    skipped.append(Skipped("?", split, split_rel, f"empty {layout.id_column}"))
                    continue
                pid = _norm_id(raw_id)
                if pid in seen:
                    skipped.append(Skipped(pid, split, split_rel, f"already listed in split '{seen[pid]}'"))
                    continue
                seen[pid] = split
                score = pd.to_numeric(pd.Series([row[layout.score_column]]), errors="coerce").iloc[0]
                if not np.isfinite(score):
                    skipped.append(Skipped(pid, split, split_rel, f"no {layout.score_column} value"))
                    continue
                binary = float(score >= layout.binary_threshold)
                if has_binary:
                    b = pd.to_numeric(pd.Series([row[layout.binary_column]]), errors="coerce").iloc[0]
                    binary = float(b) if np.isfinite(b) else binary
                folder = folders.get(pid)
                if folder is None:
                    expected = layout.participant_glob.replace("*", pid)
                    skipped.append(Skipped(pid, split, expected,
                                           f"participant folder not found under {root} "
                                           f"(glob '{layout.participant_glob}')"))
                    continue
                rels = {k: getattr(layout, k).format(id=pid) for k in ("transcript", "mfcc", "openface")}
                shown = {k: _rel(folder / r, root) for k, r in rels.items()}
                current = shown["transcript"]
                try:
                    utts = _utterances(_find(folder, rels["transcript"]), shown["transcript"], layout)
                    ids, raw_text = _tokenize(tok, utts, text_len)
                    current = shown["mfcc"]
                    a_cols, audio = _audio(_find(folder, rels["mfcc"]), shown["mfcc"], layout, audio_frames, stats)
                    current = shown["openface"]
                    v_cols, vision = _vision(_find(folder, rels["openface"]), shown["openface"], layout,
                                             vision_frames, stats, include_gaze)
                except _Broken as exc:
                    skipped.append(Skipped(pid, split, exc.file, exc.reason))
                    continue
                except Exception as exc:  # never abort the build for one participant
                    skipped.append(Skipped(pid, split, current, f"unexpected {type(exc).__name__}: {exc}"))
                    continue
                samples.append(_Sample(pid, split, ids, raw_text, a_cols, audio, v_cols, vision,
                                       float(score), binary, shown))
    finally:
        bar.close()

    # one feature layout for everyone: the most common column set (or the one the layout fixes)
    if samples:
        ref_a = _reference_columns(samples, "audio", layout.mfcc_columns)
        ref_v = _reference_columns(samples, "vision", None)
        usable = []
        for s in samples:
            for attr, ref in (("audio", ref_a), ("vision", ref_v)):
                cols = getattr(s, f"{attr}_cols")
                missing = [c for c in ref if c not in cols]
                if missing:
                    kind = "mfcc" if attr == "audio" else "openface"
                    skipped.append(Skipped(s.pid, s.split, s.files[kind],
                                           f"missing column(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                                           f"that the other participants have"))
                    break
                setattr(s, attr, _select(getattr(s, attr), cols, ref))
            else:
                usable.append(s)
        samples = usable

    for split in SPLITS:
        if not any(s.split == split for s in samples):
            reasons = [f"{s.participant}: {s.reason}" for s in skipped if s.split == split][:5]
            raise ValueError(
                f"split '{split}' has no usable participant ({len(tables[split])} listed in "
                f"{root / layout.splits[split]}); first problems: {reasons or 'none listed'}")

    audio_dim = len(stats) * len(ref_a)
    vision_dim = len(stats) * len(ref_v)
    data: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        part = [s for s in samples if s.split == split]
        n = len(part)
        ids = np.full((n, text_len), pad_id, dtype=np.int64)
        mask = np.zeros((n, text_len), dtype=np.int64)
        for i, s in enumerate(part):
            seq = [cls_id, *s.ids, sep_id]
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        audio, audio_lengths = _pad([s.audio for s in part], audio_frames, audio_dim)
        vision, vision_lengths = _pad([s.vision for s in part], vision_frames, vision_dim)
        scores = np.array([s.score for s in part], dtype=np.float32)
        data[split] = {
            "raw_text": np.array([s.raw_text for s in part], dtype=str),
            "id": np.array([f"{DATASET_NAME}$_${s.pid}" for s in part], dtype=str),
            "text_bert": np.stack([ids, mask, np.zeros_like(ids)], axis=1).astype(np.float32),
            "text": _token_features(ids, mask, text_feature_dim, 0),
            "audio": audio, "audio_lengths": audio_lengths,
            "vision": vision, "vision_lengths": vision_lengths,
            "regression_labels": scores,
            "classification_labels": np.array([s.binary for s in part], dtype=np.float32),
        }

    with atomic_file(out, "wb") as f:
        pickle.dump(data, f, protocol=4)
        if out.exists() and not overwrite:  # appeared while we were working
            raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    listed = set(seen)
    return ConversionSummary(
        kept={split: len(data[split]["id"]) for split in SPLITS}, skipped=skipped, path=out,
        feature_dims=(text_feature_dim, audio_dim, vision_dim), seq_lens=(text_len, audio_frames, vision_frames),
        unlisted=sorted((p for p in folders if p not in listed), key=lambda p: (len(p), p)),
    )


# --------------------------------------------------------------------------------------------
# a tiny synthetic corpus in E-DAIC's layout

MFCC_COLUMNS = tuple([f"pcm_fftMag_mfcc[{i}]" for i in range(13)] + [f"pcm_fftMag_mfcc_de[{i}]" for i in range(13)]
                     + [f"pcm_fftMag_mfcc_de_de[{i}]" for i in range(13)])
AU_INTENSITIES = ("AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15", "AU17",
                  "AU20", "AU23", "AU25", "AU26", "AU45")
AU_PRESENCE = ("AU01", "AU02", "AU04", "AU05", "AU06", "AU07", "AU09", "AU10", "AU12", "AU14", "AU15", "AU17",
               "AU20", "AU23", "AU25", "AU26", "AU28", "AU45")
OPENFACE_COLUMNS = ("frame", "timestamp", "confidence", "success",
                    *(f"pose_{a}{b}" for a in "TR" for b in "xyz"),
                    *(f"gaze_{e}_{c}" for e in "01" for c in "xyz"), "gaze_angle_x", "gaze_angle_y",
                    *(f"{a}_r" for a in AU_INTENSITIES), *(f"{a}_c" for a in AU_PRESENCE))
BROKEN_KINDS = ("missing_openface", "unreadable_mfcc", "openface_without_aus", "empty_transcript")

_LOW = ("i am doing okay", "things have been pretty good lately", "i like spending time with my friends",
        "i sleep fine most nights", "work is going well", "i feel relaxed on the weekends")
_HIGH = ("i have been feeling really down", "i can't sleep at night", "i don't enjoy anything anymore",
         "i feel tired all the time", "it is hard to concentrate", "i feel like a failure sometimes")
_NEUTRAL = ("i'm from los angeles", "i studied business in college", "my family lives nearby",
            "um yeah i guess so", "i work in an office", "the weather was nice today")


def _default_participants() -> dict[str, list[int]]:
    return {"train": [300, 301, 302, 303, 304], "valid": [305, 306, 307], "test": [600, 601, 602]}


def write_synthetic_edaic(
    root: str | os.PathLike[str], participants: Mapping[str, Sequence[int]] | None = None, *, seed: int = 0,
    broken: Sequence[str] = (), frames: tuple[int, int] = (300, 240), sentences: tuple[int, int] = (4, 9),
) -> Path:
    """Writes a tiny synthetic corpus in E-DAIC's layout (default :class:`Layout`); returns ``root``.

    ``participants`` maps 'train'/'valid'/'test' to participant ids (default 5/3/3 ids). Each gets
    ``<id>_P/<id>_Transcript.csv`` (Start_Time, End_Time, Text, Confidence; a few lowercase
    sentences, rows deliberately not in time order), ``features/<id>_OpenSMILE2.3.0_mfcc.csv``
    (';'-separated, name;frameTime + the 39 MFCC_0_D_A columns) and
    ``features/<id>_OpenFace2.1.0_Pose_gaze_AUs.csv`` (', '-separated with OpenFace's leading spaces:
    frame, timestamp, confidence, success, pose, gaze, AU*_r, AU*_c; about 10% of frames have
    success 0); ``labels/{train,dev,test}_split.csv`` hold Participant_ID, Gender, PHQ_Binary,
    PHQ_Score. Frame counts are drawn in ``frames = (mfcc, openface) +- 50%``, sentence counts in
    ``sentences``. Scores (0-24) leave a weak trace: the share of low-mood sentences, MFCC[1] and
    AU04_r/AU15_r grow with them.

    The ids in ``broken`` get a bad file, by position: the 1st a missing OpenFace file, the 2nd an
    unreadable (binary) MFCC file, the 3rd an OpenFace file without AU columns, the 4th an empty
    transcript (then round again); see ``BROKEN_KINDS``. Deterministic given ``seed``.
    """
    root = Path(root)
    participants = dict(_default_participants() if participants is None else participants)
    unknown = set(participants) - set(SPLITS)
    if unknown:
        raise ValueError(f"participants keys must be among {list(SPLITS)}, got {sorted(unknown)}")
    broken_kind = {str(b): BROKEN_KINDS[i % len(BROKEN_KINDS)] for i, b in enumerate(broken)}
    files = {"train": "train_split.csv", "valid": "dev_split.csv", "test": "test_split.csv"}
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        rows = []
        for pid in participants.get(split, []):
            rng = np.random.default_rng([seed, int(pid)])
            score = int(rng.integers(0, 25))
            gender = "male" if rng.random() < 0.5 else "female"
            rows.append({"Participant_ID": int(pid), "Gender": gender, "PHQ_Binary": int(score >= 10),
                         "PHQ_Score": score})
            _write_participant(root, str(pid), score, rng, broken_kind.get(str(pid)), frames, sentences)
        pd.DataFrame(rows, columns=["Participant_ID", "Gender", "PHQ_Binary", "PHQ_Score"]).to_csv(
            root / "labels" / files[split], index=False)
    return root


def _write_participant(root: Path, pid: str, score: int, rng: np.random.Generator, broken: str | None,
                       frames: tuple[int, int], sentences: tuple[int, int]) -> None:
    folder = root / f"{pid}_P"
    (folder / "features").mkdir(parents=True, exist_ok=True)
    z = score / 24.0

    # transcript: sentences drawn from low/high mood pools by score, plus neutral small talk
    n = int(rng.integers(sentences[0], sentences[1] + 1))
    texts = []
    for _ in range(n):
        r = rng.random()
        pool = _NEUTRAL if r < 0.3 else (_HIGH if rng.random() < z else _LOW)
        texts.append(pool[int(rng.integers(len(pool)))])
    starts = np.cumsum(rng.uniform(2.0, 8.0, size=n))
    df = pd.DataFrame({"Start_Time": starts.round(1), "End_Time": (starts + rng.uniform(0.5, 2.0, n)).round(1),
                       "Text": texts, "Confidence": rng.uniform(0.6, 1.0, n).round(6)})
    df = df.iloc[rng.permutation(n)] if n > 1 else df  # convert() must sort by Start_Time
    if broken == "empty_transcript":
        df = df.iloc[:0]
    df.to_csv(folder / f"{pid}_Transcript.csv", index=False)

    # openSMILE MFCC: name;frameTime;39 coefficients, 100 frames/s
    t_a = max(2, int(frames[0] * rng.uniform(0.5, 1.5)))
    mfcc = rng.standard_normal((t_a, len(MFCC_COLUMNS))) * 5.0
    mfcc[:, 1] += 8.0 * z
    path = folder / "features" / f"{pid}_OpenSMILE2.3.0_mfcc.csv"
    if broken == "unreadable_mfcc":
        path.write_bytes(b"\xff\xfe\x00\x81garbage\x00\xc3(" * 16)
    else:
        mf = pd.DataFrame(mfcc.round(6), columns=list(MFCC_COLUMNS))
        mf.insert(0, "frameTime", (np.arange(t_a) * 0.01).round(2))
        mf.insert(0, "name", "'unknown'")
        mf.to_csv(path, sep=";", index=False)

    # OpenFace 2.1: 30 frames/s, header and values separated by ', '
    t_v = max(2, int(frames[1] * rng.uniform(0.5, 1.5)))
    success = (rng.random(t_v) > 0.1).astype(int)
    success[0] = 1
    cols: dict[str, np.ndarray] = {
        "frame": np.arange(1, t_v + 1), "timestamp": (np.arange(t_v) / 30).round(3),
        "confidence": np.where(success == 1, rng.uniform(0.85, 0.98, t_v), 0.0).round(2), "success": success,
    }
    for a, scale, offset in (("T", 20.0, (10.0, 60.0, 600.0)), ("R", 0.1, (0.1, 0.0, 0.0))):
        for k, c in enumerate("xyz"):
            cols[f"pose_{a}{c}"] = (offset[k] + scale * rng.standard_normal(t_v)).round(3)
    for e in "01":
        for c in "xyz":
            cols[f"gaze_{e}_{c}"] = (0.3 * rng.standard_normal(t_v)).round(6)
    cols["gaze_angle_x"] = (0.2 * rng.standard_normal(t_v)).round(3)
    cols["gaze_angle_y"] = (0.2 * rng.standard_normal(t_v)).round(3)
    for au in AU_INTENSITIES:
        boost = 2.0 * z if au in ("AU04", "AU15") else 0.0
        cols[f"{au}_r"] = np.clip(rng.gamma(1.0, 0.5, t_v) + boost, 0, 5).round(2)
    for au in AU_PRESENCE:
        cols[f"{au}_c"] = (rng.random(t_v) < 0.3).astype(float)
    of = pd.DataFrame(cols)[list(OPENFACE_COLUMNS)]
    for c in of.columns:  # OpenFace's failed frames are all zeros
        if c not in ("frame", "timestamp", "success", "confidence"):
            of.loc[success == 0, c] = 0.0
    path = folder / "features" / f"{pid}_OpenFace2.1.0_Pose_gaze_AUs.csv"
    if broken == "missing_openface":
        if path.exists():
            path.unlink()
        return
    if broken == "openface_without_aus":
        of = of[[c for c in of.columns if not c.startswith("AU")]]
    lines = [", ".join(of.columns)]
    lines += [", ".join(f"{v:g}" for v in values) for values in of.to_numpy(dtype=np.float64)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
