"""The earlier name of ``mmsa_emt.mmsa``, the subpackage that knows MMSA: its names, re-exported for old imports.
The robustness trial runner (``run_missing_trial``) now lives in ``mmsa_emt.robustness.trial``."""

from MMSA.utils import setup_seed  # noqa: F401

from .mmsa.config import (  # noqa: F401
    _config_regression,
    _config_tune,
    _set_device_if_cuda,
    check_args,
    is_ours,
    load_config,
    loss_weights_from_args,
    model_config_from_args,
    optim_config_from_args,
    speed_config_from_args,
    translate,
    trial_args,
)
from .mmsa.config import is_ours as _is_ours  # noqa: F401
from .mmsa.data import (  # noqa: F401
    DEFAULT_MISSING_SEEDS,
    MMSA_DATASETS,
    MMSA_UNK_ID,
    NATIVE_MISSING,
    SIMS_LABEL_KEYS,
    _Batches,
    _MMDataset,
    _mmsa_data_loader,
    _settings_checked_loader,
    at_missing_rates,
    batch_from_mmsa,
    checked_data_loader,
    checked_test_loader,
    checked_test_loaders,
    reads_incomplete_view,
)
from .mmsa.data import at_missing_rates as _at_missing_rates  # noqa: F401
from .mmsa.inference import _ORIGINAL_MMSA_TEST, mmsa_test  # noqa: F401
from .mmsa.mends import encoder_width  # noqa: F401
from .mmsa.models import AMIO, ATIO, CheckpointError, display_name, load_weights  # noqa: F401
from .mmsa.patches import PATCHES, register  # noqa: F401
from .mmsa.results import append_results  # noqa: F401
from .mmsa.trainer import MINIMIZED_KEYS, EMTDLFRTrainer, _checkpoint_path, logger  # noqa: F401
from .robustness.trial import run_missing_trial  # noqa: F401  (robustness code, re-exported for old imports)
