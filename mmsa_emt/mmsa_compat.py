"""The earlier name of ``mmsa_emt.mmsa``, the subpackage that knows MMSA: its names, re-exported for old imports."""

from MMSA.utils import setup_seed  # noqa: F401

from .mmsa.config import (  # noqa: F401
    _config_regression,
    _config_tune,
    _set_device_if_cuda,
    is_ours,
    load_config,
    loss_weights_from_args,
    model_config_from_args,
    optim_config_from_args,
    speed_config_from_args,
    translate,
)
from .mmsa.config import is_ours as _is_ours  # noqa: F401
from .mmsa.data import (  # noqa: F401
    DEFAULT_MISSING_SEEDS,
    MMSA_DATASETS,
    MMSA_UNK_ID,
    SIMS_LABEL_KEYS,
    _Batches,
    _MMDataset,
    _mmsa_data_loader,
    batch_from_mmsa,
    checked_data_loader,
    checked_test_loader,
    checked_test_loaders,
)
from .mmsa.inference import _ORIGINAL_MMSA_TEST, mmsa_test  # noqa: F401
from .mmsa.mends import encoder_width  # noqa: F401
from .mmsa.models import AMIO, ATIO, CheckpointError, load_weights  # noqa: F401
from .mmsa.patches import PATCHES, register  # noqa: F401
from .mmsa.results import append_results  # noqa: F401
from .mmsa.trainer import MINIMIZED_KEYS, EMTDLFRTrainer, _checkpoint_path, logger  # noqa: F401
from .mmsa.trials import (  # noqa: F401
    NATIVE_MISSING,
    _at_missing_rates,
    _settings_checked_loader,
    check_args,
    display_name,
    reads_incomplete_view,
    run_missing_trial,
    trial_args,
)
