"""Mends of MMSA's built-in models, so that they run offline with a local encoder of any width under torch 2.13:
the classes and functions here are put into MMSA's modules by ``patches.register`` (see ``patches.PATCHES``)."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from easydict import EasyDict
from MMSA.models.missingTask.TFR_NET.model import TFR_NET as MMSA_TFR_NET
from MMSA.models.singleTask.MISA import MISA as MMSA_MISA
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .. import settings

logger = logging.getLogger("MMSA")
TFR_NET_ENCODER = "bert-base-uncased"  # the encoder MMSA's TFR-Net loads whatever the config says


class _ReduceLROnPlateau(ReduceLROnPlateau):
    """Accepts the ``verbose`` argument that MMSA's MulT, MMIM and TFR-Net trainers pass and torch 2.13 refuses."""

    def __init__(self, *args: Any, verbose: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


def encoder_width(pretrained: Any) -> int | None:
    """hidden_size of a local encoder folder (None for a hub name)."""
    config = Path(str(pretrained or "")).expanduser() / "config.json"
    return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"]) if config.is_file() else None


def _mend_builtin_args(args: EasyDict, *, n_train: int, n_batches: int) -> None:
    """Args of MMSA's built-in models, after its loader and before the model is built:

    - the text width follows the loaded encoder (MMSA's loader forces feature_dims[0] = 768 with use_bert,
      which breaks MMIM, TFR-Net and Self_MM with a 384- or 32-wide encoder);
    - ``train_samples`` is the real training-set size (Self_MM sizes its label tables with it);
    - gradient accumulation over more batches than an epoch has would never step: capped at one epoch;
    - TFR-Net's temporal transformers take the sequence lengths as widths: they must divide by its heads.
    """
    width = encoder_width(args.get("pretrained")) if args.get("use_bert") else None
    if width is not None:
        args["feature_dims"][0] = width
        if args["model_name"] == "self_mm":
            args["text_out"] = width
    args["train_samples"] = n_train
    if settings.get(args, "update_epochs") > n_batches:
        logger.warning(f"update_epochs={args['update_epochs']} is more than the {n_batches} training batches of "
                       f"an epoch: MMSA's trainer would never step; using {n_batches}")
        args["update_epochs"] = n_batches
    if args["model_name"] == "tfr_net":
        heads, lengths = int(args["num_temporal_head"]), [int(n) for n in args["seq_lens"]]
        if any(n % heads for n in lengths):
            raise ValueError(f"TFR_Net uses the sequence lengths {lengths} as transformer widths with "
                             f"num_temporal_head={heads}; each must be divisible by it: set num_temporal_head to "
                             f"a common divisor, e.g. {math.gcd(*lengths)}")


class _MISA(MMSA_MISA):
    """MISA with the text projection sized from the loaded encoder (MMSA hard-codes 768) and audio/vision
    packing lengths kept within the sequences (MMSA packs them with the text token counts)."""

    def __init__(self, config: EasyDict) -> None:
        super().__init__(config)
        if config.use_bert:
            width = self.bertmodel.model.config.hidden_size
            if width != self.project_t.project_t.in_features:
                self.project_t.project_t = nn.Linear(width, config.hidden_size)

    def extract_features(self, sequence, lengths, rnn1, rnn2, layer_norm):
        return super().extract_features(sequence, lengths.clamp(min=1, max=sequence.size(1)), rnn1, rnn2,
                                        layer_norm)


class _TFRNet(MMSA_TFR_NET):
    """TFR-Net with the configured ``pretrained`` encoder (MMSA always asks the hub for bert-base-uncased)."""

    def __init__(self, args: EasyDict) -> None:
        module = importlib.import_module(MMSA_TFR_NET.__module__)
        original = module.BertTextEncoder
        pretrained = args["pretrained"] if "pretrained" in args else TFR_NET_ENCODER
        module.BertTextEncoder = functools.partial(original, transformers=settings.get(args, "transformers"),
                                                   pretrained=pretrained)
        try:
            super().__init__(args)
        finally:
            module.BertTextEncoder = original
