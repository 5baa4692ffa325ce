"""``MMSA_test`` for our models (``mmsa_test``): one sample's prediction from saved weights, loaded strictly, with
the sample read up to its lengths and errors naming the file and key at fault."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import MMSA.run as mmsa_run
import numpy as np
import torch
from easydict import EasyDict

from .. import checkpoint, settings
from .config import is_ours as _is_ours
from .models import AMIO, load_weights

_ORIGINAL_MMSA_TEST = mmsa_run.MMSA_test


def _test_args(config: Any) -> dict:
    """MMSA_test's config: a dict of args, or the path of a JSON file holding one."""
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"MMSA_test config file not found: {path}")
        args = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(args, dict) and "datasetCommonParams" in args:
            raise ValueError(f"{path} is an MMSA config file of several models; MMSA_test takes one run's args: "
                             "pass mmsa_emt.load_config(model, dataset, config_file)")
        return args
    if isinstance(config, dict):
        return config
    raise ValueError(f"'config' should be a path or a dict, not {type(config).__name__}")


def _read_test_sample(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One sample's features for MMSA_test (``text_bert`` (3, l), ``audio`` (t_a, f_a), ``vision`` (t_v, f_v),
    optional ``audio_lengths``/``vision_lengths``), with errors naming the file and key."""
    try:
        with open(path, "rb") as f:
            sample = pickle.load(f)
    except OSError:
        raise
    except Exception as error:  # pickle raises UnpicklingError, EOFError, ValueError, ... for what is no pickle
        raise ValueError(f"{path} is not a readable pickle of one sample's features ({type(error).__name__}: "
                         f"{error})") from error
    if not isinstance(sample, Mapping):
        raise ValueError(f"{path} holds a {type(sample).__name__}; MMSA_test wants a dict of one sample's features")
    out = {}
    for key, ndim in (("text_bert", 2), ("audio", 2), ("vision", 2)):
        if key not in sample:
            raise KeyError(f"{path} has no '{key}' (it has: {', '.join(map(str, sample))}); EMT-DLFR reads "
                           "text_bert (token ids, mask, segment ids: (3, l)), audio (t_a, f_a) and vision (t_v, f_v)")
        value = np.asarray(sample[key], dtype=np.float32)
        if value.ndim != ndim or 0 in value.shape:
            raise ValueError(f"{path}: '{key}' has shape {value.shape}; one sample's features without the batch "
                             "axis are wanted (text_bert (3, l), audio (t_a, f_a), vision (t_v, f_v))")
        out[key] = value
    if out["text_bert"].shape[0] != 3:
        raise ValueError(f"{path}: 'text_bert' has shape {out['text_bert'].shape}, not (3, l)")
    for name in ("audio", "vision"):
        out[f"{name}_lengths"] = _sample_length(sample, name, out[name], path)
    return out


def _sample_length(sample: Mapping[str, Any], name: str, frames: np.ndarray, path: Any) -> int:
    """The number of real frames of ``name``: ``<name>_lengths`` from the sample, else the full length, refusing
    trailing all-zero frames (padding in MMSA's feature files) rather than reading them as real."""
    key, total = f"{name}_lengths", frames.shape[0]
    if key not in sample:
        real = np.flatnonzero(np.any(frames != 0, axis=1))
        trailing = total - (int(real[-1]) + 1 if real.size else 0)
        if trailing:
            raise ValueError(f"{path}: the last {trailing} of the {total} frames of '{name}' are all zeros and the "
                             f"sample has no '{key}'; zero frames at the end are padding in MMSA's feature files and "
                             f"would be read as real frames. Add '{key}' (the number of real frames, e.g. from the "
                             f"split's '{key}'; {total} if the zero frames are real)")
        return total
    value = np.asarray(sample[key]).reshape(-1)
    if value.size != 1 or value.dtype.kind not in "iuf" or not float(value[0]).is_integer() \
            or not 0 <= value[0] <= total:
        raise ValueError(f"{path}: '{key}' must be one whole number of frames in [0, {total}] (the length of "
                         f"'{name}'), got {sample[key]!r}")
    return int(value[0])


def mmsa_test(config: Any, weights_path: str | os.PathLike, feature_path: str | os.PathLike,
              gpu_id: int = 0) -> Any:
    """``MMSA_test`` (one sample's prediction from saved weights). For mmsa-emt's models: a checkpoint that
    carries its config is rebuilt from it (``checkpoint``; ``config`` then only names the model), weight-only files
    are built from ``config`` and loaded strictly (``load_weights``), an unreadable weights or feature file is
    named, and audio/vision are read up to the sample's ``audio_lengths``/``vision_lengths`` (without them,
    trailing all-zero frames are refused). Other models go to MMSA's own ``MMSA_test``."""
    args = _test_args(config)
    if not _is_ours(args):
        return _ORIGINAL_MMSA_TEST(config, weights_path, feature_path, gpu_id)
    sample = _read_test_sample(feature_path)
    device = torch.device("cpu") if gpu_id < 0 else settings.checked_assign_gpu([gpu_id])  # absent: an error
    lengths = {name: max(sample[f"{name}_lengths"], 1) for name in ("audio", "vision")}  # the model reads >= 1
    inputs = {"text": sample["text_bert"], **{name: sample[name][:lengths[name]] for name in ("audio", "vision")}}
    args = EasyDict(dict(args))
    # the model does not read feature_dims[0]: its text width follows the loaded encoder
    text_dim = args["feature_dims"][0] if args.get("feature_dims") else settings.get(args, "text_out")
    args.update(train_mode="regression", device=device,
                feature_dims=[text_dim, inputs["audio"].shape[1], inputs["vision"].shape[1]],
                seq_lens=[inputs["text"].shape[1], inputs["audio"].shape[0], inputs["vision"].shape[0]])
    saved = checkpoint.load_file(weights_path, map_location="cpu")
    if checkpoint.is_packaged(saved):  # the network as the file's config says, not as the args say
        model = checkpoint.build(checkpoint.from_saved(saved, str(weights_path)))
        checkpoint.check_input_widths(model.config, inputs["audio"].shape[1], inputs["vision"].shape[1],
                                      f"{feature_path} (for {weights_path})")
    else:
        model = AMIO(args)
        load_weights(model, saved, source=str(weights_path))
    model.to(device).eval()
    batch = {k: torch.from_numpy(v)[None].to(device) for k, v in inputs.items()}
    with torch.no_grad():
        output = model(batch["text"], batch["audio"], batch["vision"], torch.tensor([lengths["audio"]]),
                       torch.tensor([lengths["vision"]]))["M"]
    return output.cpu().numpy()[0][0]
