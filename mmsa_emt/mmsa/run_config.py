"""What one EMT-DLFR run under MMSA is configured by: one dataclass per concern, each holding its defaults once.

The network (``EMTDLFRConfig``), the optimizer (``OptimConfig``), the loss (``LossWeights``) and how to compute
(``SpeedConfig``) own their dataclasses next to the code that reads them; ``TrainingConfig`` holds the few settings
of MMSA's trainer interface. ``mmsa_emt.settings`` takes its defaults from these fields, and
``mmsa_emt.mmsa.config.translate`` fills a ``RunConfig`` from MMSA's args.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dlfr import LossWeights
from ..fast import SpeedConfig
from ..model import EMTDLFRConfig
from ..trainer import OptimConfig


@dataclass(frozen=True)
class TrainingConfig:
    """The settings of MMSA's trainer interface (MMSA's key names in comments)."""

    key_eval: str = "Loss"  # KeyEval: the validation result that picks the best epoch
    early_stop: int = 8  # epochs without improvement before training stops
    max_epochs: int | None = None  # None: until early_stop
    update_epochs: int = 1  # batches whose gradients are accumulated per optimizer step
    authors_training: bool = False  # fp32 and the last partial accumulation group dropped, as the authors' loop
    verbose_level: int = 1  # 0: errors only, 1: progress and results, 2: debug


@dataclass(frozen=True)
class RunConfig:
    """Everything one run of EMT-DLFR reads from MMSA's args, translated (``mmsa.config.translate``)."""

    model: EMTDLFRConfig
    optim: OptimConfig
    loss: LossWeights
    speed: SpeedConfig  # resolved against ``device``
    training: TrainingConfig
    device: torch.device
