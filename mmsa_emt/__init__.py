"""mmsa-emt: EMT-DLFR (Sun et al., IEEE TAC 2023, arXiv 2208.07589) as a plug-in model for MMSA.

``import mmsa_emt`` registers the model with MMSA, after which ``MMSA_run('EMT-DLFR', ...)`` and ``MMSA_test`` work.
"""

from .checkpoint import from_pretrained
from .dlfr import DLFR, LossWeights, TwoViewBatch, compute_loss
from .mmsa.config import load_config
from .mmsa.patches import register
from .model import EMTDLFR, EMTDLFRConfig
from .registry import list_models

register()

__all__ = ["DLFR", "EMTDLFR", "EMTDLFRConfig", "LossWeights", "TwoViewBatch", "compute_loss", "from_pretrained",
           "list_models", "load_config", "register"]
__version__ = "0.1.0"
