"""The earlier name of ``mmsa_emt.dlfr`` (the DLFR objective), kept so that existing imports keep working."""

from .dlfr import (
    DLFR,
    DualLevelRestoration,
    LossOutput,
    LossWeights,
    TwoViewBatch,
    attraction_loss,
    compute_loss,
    masked_reconstruction_loss,
    negative_cosine,
    upgrade_state_dict,
)

__all__ = ["DLFR", "DualLevelRestoration", "LossOutput", "LossWeights", "TwoViewBatch", "attraction_loss",
           "compute_loss", "masked_reconstruction_loss", "negative_cosine", "upgrade_state_dict"]
