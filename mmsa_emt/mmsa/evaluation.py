"""Saved weights evaluated on a split of a feature file, as MMSA's ``_run`` tests a model (``mmsa-emt test``).

The data pass through the same checked loaders as in ``MMSA_run`` and the metrics come from the model's MMSA
trainer (``do_test``: the dataset's metric set, plus the losses for EMT-DLFR), so a checkpoint tested on the test
split at its training missing rate gives the metrics of ``MMSA_run``'s test for that seed (up to MMSA's last rounded
digit: a prediction moves by float rounding with the other samples of its batch). The split is read in file order;
EMT-DLFR's ``Loss``/``Loss(pred_m)`` are means of batch means, which MMSA's shuffled test loader makes depend on the
batch order, so those two may differ a little from ``MMSA_run``'s (the metrics are per sample).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from easydict import EasyDict
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import checkpoint as checkpoint_format
from .. import fast, settings
from ..checkpoint import CheckpointError, load_weights
from .config import _set_device_if_cuda, check_args, speed_config_from_args, trial_args
from .config import is_ours as _is_ours
from .data import at_missing_rates, checked_data_loader
from .models import AMIO, ATIO, display_name
from .results import append_results

SPLITS = ("test", "valid", "train")


class _Held(nn.Module):
    """Holds a rebuilt network under ``Model``, as MMSA's AMIO does (what EMT-DLFR's trainer reads)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.Model = net

    def forward(self, *inputs: Tensor) -> Any:
        return self.Model(*inputs)


def evaluation_args(path: str | os.PathLike, dataset: str, config_file: str | os.PathLike | None, *,
                    model: str | None = None, missing_rate: float | None = None, gpu_ids: Sequence[int] = (),
                    default_config: str | os.PathLike = "") -> tuple[EasyDict, checkpoint_format.Checkpoint]:
    """MMSA's args for testing the weights at ``path`` and the checkpoint read, everything checked before any data
    is read. A checkpoint that carries its config brings its model name and run settings (the data location comes
    from ``config_file``, else ``default_config``); a weight-only file needs ``config_file`` (and ``model``, if not
    EMT-DLFR)."""
    saved = checkpoint_format.read(path)
    if saved.packaged:
        model_name, overrides = saved.model_name or "emt-dlfr", saved.settings
        if model is not None and display_name(model) != display_name(model_name):
            raise CheckpointError(f"{path} holds a {display_name(model_name)} model, not {model}")
        config_file = config_file or default_config
    else:
        if not config_file:
            raise CheckpointError(f"{path} holds weights only, no model config: pass -c/--config CONFIG, the config "
                                  "file it was trained with (and -m/--model MODEL if it is not EMT-DLFR)")
        model_name, overrides = model or "emt-dlfr", {}
    if missing_rate is not None and not 0.0 <= missing_rate <= 1.0:
        raise settings.SettingError(f"--missing-rate {missing_rate}: a rate must be in [0, 1]")
    args = trial_args(model_name, dataset, config_file, overrides=overrides, gpu_ids=gpu_ids)
    return args, saved


def evaluate_checkpoint(path: str | os.PathLike, dataset: str, config_file: str | os.PathLike | None = None, *,
                        model: str | None = None, split: str = "test", missing_rate: float | None = None,
                        gpu_ids: Sequence[int] = (), num_workers: int = 0,
                        default_config: str | os.PathLike = "") -> tuple[dict[str, float], EasyDict]:
    """The metrics of the weights at ``path`` on ``split`` of ``dataset``'s feature file (see the module
    docstring), at ``missing_rate`` for every modality (None: the rate of the run's settings, or of the config for
    a weight-only file); returns them with the args used."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    args, saved = evaluation_args(path, dataset, config_file, model=model, missing_rate=missing_rate,
                                  gpu_ids=gpu_ids, default_config=default_config)
    with tempfile.TemporaryDirectory(prefix="mmsa-emt-test-") as cache:
        if missing_rate is not None:
            args = at_missing_rates(args, [missing_rate] * 3, Path(cache))
            check_args(args)
        _set_device_if_cuda(args["device"])
        loaders = checked_data_loader(args, num_workers)  # the feature widths are set in args from here
    if saved.packaged:
        net = checkpoint_format.build(saved)
        checkpoint_format.check_input_widths(net.config, int(args["feature_dims"][1]), int(args["feature_dims"][2]),
                                             str(args["featurePath"]))
        held: nn.Module = _Held(fast.apply(net, speed_config_from_args(args), args["device"]))
    else:
        held = AMIO(args)
        state = checkpoint_format.load_file(path, map_location="cpu")
        if _is_ours(args):
            load_weights(held, state, source=str(path))
        else:
            try:
                held.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise CheckpointError(f"{path} does not fit this {display_name(args['model_name'])} model of "
                                      f"{args['config_file']}: {error}") from error
    held.to(args["device"]).eval()
    loader = loaders[split]  # in file order: MMSA's loaders shuffle every split, which moves the batch-mean losses
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, num_workers=num_workers)
    results = ATIO().getTrain(args).do_test(held, ordered, mode=split.upper())
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}, args


def save_results(out: str | os.PathLike, results: Mapping[str, float], *, checkpoint: str | os.PathLike,
                 args: Mapping[str, Any], split: str, missing_rate: float | None) -> None:
    """Adds one row to the CSV ``out`` (created if absent; rows already there are kept, never overwritten)."""
    rates = [float(r) for r in args["missing_rate"]] if args.get("data_missing") else (
        [missing_rate] * 3 if missing_rate is not None else None)
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "checkpoint": str(checkpoint),
           "Model": display_name(str(args["model_name"])), "dataset": str(args["dataset_name"]), "split": split,
           "missing_rate": json.dumps(rates), "config": str(args.get("config_file") or ""), **results}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    append_results(out, pd.DataFrame([row]))


__all__ = ["SPLITS", "evaluate_checkpoint", "evaluation_args", "save_results"]
