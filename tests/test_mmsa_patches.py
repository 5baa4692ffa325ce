"""Canaries of ``mmsa_emt.mmsa.patches.PATCHES``: after ``register()`` every target is ours, MMSA still reads each
name we replace where we replace it, and MMSA's original still has the behaviour each patch mends. A new MMSA
release that fixes or changes one of them fails the test named in the patch's row, so the patch can be reviewed."""

import builtins
import inspect
import logging
import pickle
import types
from pathlib import Path

import MMSA
import MMSA.config
import MMSA.run as mmsa_run
import MMSA.utils
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from easydict import EasyDict
from MMSA.models.AMIO import AMIO as MMSA_AMIO
from MMSA.models.missingTask.TFR_NET.model import TFR_NET as MMSA_TFR_NET
from MMSA.models.singleTask.MISA import MISA as MMSA_MISA
from MMSA.models.subNets.BertTextEncoder import BertTextEncoder as MMSA_BertTextEncoder
from MMSA.trains.ATIO import ATIO as MMSA_ATIO
from MMSA.utils import MetricsTop

import mmsa_emt
from mmsa_emt import settings
from mmsa_emt.mmsa import data as mmsa_data
from mmsa_emt.mmsa import inference, patches
from mmsa_emt.mmsa.config import load_config, trial_args
from mmsa_emt.mmsa.models import CheckpointError
from mmsa_emt.mmsa.patches import EXTENDED, PATCHES, REPLACED, SCOPED, current
from mmsa_emt.mmsa.results import _ResultsRows
from mmsa_emt.settings import SettingError


def _names_read(module: types.ModuleType) -> set[str]:
    """Every global and attribute name the code of ``module``'s source file reads (compiled afresh from the file,
    so that functions we replaced are read as MMSA wrote them)."""
    names, stack = set(), [compile(inspect.getsource(module), module.__file__, "exec")]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


# ----------------------------------------------------------------------------------------------- the table itself
def test_every_replaced_target_is_ours_after_register():
    mmsa_emt.register()
    mmsa_emt.register()  # safe to call again
    replaced = [p for p in PATCHES if p.how == REPLACED]
    assert len(replaced) >= 18
    for patch in replaced:
        assert current(patch.target) is patch.by, patch.target
    assert {p.how for p in PATCHES} == {REPLACED, EXTENDED, SCOPED}


def test_mmsa_reads_every_patched_name_where_we_patch_it():
    """A replaced or swapped module global that MMSA no longer reads would be a patch that silently stopped
    working (e.g. MMSA importing ``torch.load`` by name instead of reading ``torch`` at call time)."""
    for patch in PATCHES:
        owner, name = patches._owner(patch.target)
        if isinstance(owner, types.ModuleType) and owner is not MMSA:  # MMSA.MMSA_test: users import it by name
            assert name in _names_read(owner), f"{owner.__name__} no longer reads '{name}': review {patch.target}"


def test_every_row_names_a_canary_here_and_the_docs_show_the_table():
    tests = {name for name, value in globals().items() if name.startswith("test_") and callable(value)}
    for patch in PATCHES:
        assert patch.canary in tests, f"{patch.target}: no test {patch.canary}"
        assert patch.mmsa == "2.2.1"
    doc = (REPO / "docs" / "mmsa.md").read_text()
    assert "## Patches of MMSA" in doc
    assert patches.markdown_table() in doc, "docs/mmsa.md is out of date: paste patches.markdown_table()"


# ----------------------------------------------------------------------------------------------- one canary per patch
def test_mmsa_amio_knows_only_its_models():
    with pytest.raises(KeyError, match="emt-dlfr"):
        MMSA_AMIO(EasyDict(model_name="emt-dlfr"))


def test_mmsa_atio_knows_only_its_models():
    with pytest.raises(KeyError, match="emt-dlfr"):
        MMSA_ATIO().getTrain(EasyDict(model_name="emt-dlfr"))


def test_mmsa_loader_checks_nothing(workspace, tmp_path):
    """MMSA's loader keeps NaN in vision (it zeroes only -inf in audio) and a training batch of one sample; ours
    (the patch) zeroes it with a warning and drops that batch."""
    args = trial_args("EMT-DLFR", "mosi", workspace("mosi"))
    data = pickle.loads(Path(args["featurePath"]).read_bytes())
    data["train"]["vision"][0, 0, 0] = np.nan
    bad = tmp_path / "nan.pkl"
    bad.write_bytes(pickle.dumps(data))
    n_train = len(data["train"]["id"])
    args.update(featurePath=str(bad), batch_size=n_train - 1)  # the last training batch holds one sample
    theirs = mmsa_data._mmsa_data_loader(args, 0)
    assert np.isnan(theirs["train"].dataset.vision).any()
    assert not theirs["train"].drop_last and len(theirs["train"].dataset) % theirs["train"].batch_size == 1
    with pytest.warns(UserWarning, match=r"nan\.pkl: NaN/inf values in train/vision: 1; zeroed"):
        ours = mmsa_run.MMDataLoader(args, 0)
    assert not np.isnan(ours["train"].dataset.vision).any() and ours["train"].drop_last


def test_mmsa_config_readers_leave_paths_relative(workspace):
    """MMSA joins dataset_root_dir and featurePath as written, relative to wherever the process runs; the patch
    resolves them against the config file's folder."""
    for tune, reader in ((False, MMSA.config.get_config_regression), (True, MMSA.config.get_config_tune)):
        config = workspace("mosi", tune=tune)
        theirs = reader("emt-dlfr", "mosi", str(config))["featurePath"]
        assert not Path(theirs).is_absolute()
        ours = load_config("EMT-DLFR", "mosi", config, tune=tune)["featurePath"]
        assert Path(ours) == config.parent / theirs


def test_mmsa_assign_gpu_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert MMSA.utils.assign_gpu([3]) == torch.device("cpu")  # asked for GPU 3, quietly given the CPU
    with pytest.raises(SettingError, match=r"gpu_ids=\[3\]"):
        mmsa_run.assign_gpu([3])


def test_mmsa_run_defaults_to_gpu_0(monkeypatch, caplog):
    """MMSA_run's gpu_ids defaults to [0]; a user who gives none on a machine without CUDA gets the CPU, as with
    MMSA, while an explicit [0] there is an error."""
    from mmsa_emt.mmsa.patches import _ORIGINAL_RUN_DEFAULTS

    gpu_default = inspect.signature(MMSA.run.MMSA_run).parameters["gpu_ids"].default
    assert [0] in _ORIGINAL_RUN_DEFAULTS and gpu_default == [0]
    assert gpu_default is settings.MMSA_DEFAULT_GPU_IDS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="MMSA"):
        assert mmsa_run.assign_gpu(gpu_default) == torch.device("cpu")
    assert "gpu_ids not given: running on cpu" in caplog.text
    with pytest.raises(SettingError, match=r"gpu_ids=\[0\]"):
        mmsa_run.assign_gpu([0])


def test_mmsa_sets_the_device_and_loads_through_torch(tmp_path):
    """torch refuses ``set_device`` on the CPU, which MMSA calls for every run; ``torch.load`` of an empty file
    (a reserved checkpoint name) does not name the file."""
    with pytest.raises(ValueError, match="cuda device"):
        torch.cuda.set_device(torch.device("cpu"))
    mmsa_run.torch.cuda.set_device(torch.device("cpu"))  # ours: a no-op
    assert mmsa_run.torch.cuda.is_available is torch.cuda.is_available  # the rest is torch's own
    empty = tmp_path / "reserved.pth"
    empty.touch()
    with pytest.raises(Exception) as theirs:
        torch.load(empty)
    assert str(empty) not in str(theirs.value)
    with pytest.raises(CheckpointError, match=r"reserved\.pth is empty"):
        mmsa_run.torch.load(empty)


def test_mmsa_rounds_to_numpy_scalars():
    """MMSA writes ``(round(mean), round(std))`` into its CSV; under numpy 2 that text is 'np.float64(...)'."""
    theirs = builtins.round(np.mean([0.5]) * 100, 2)
    assert "np.float64" in str((theirs, theirs))
    ours = mmsa_run.round(np.mean([0.5]) * 100, 2)
    assert str((ours, ours)) == "(50.0, 50.0)"


def test_mmsa_set_logger_adds_handlers_on_each_call(tmp_path):
    logger = logging.getLogger("MMSA")
    saved = list(logger.handlers)
    for handler in saved:
        logger.removeHandler(handler)
    try:
        for _ in range(2):
            patches._ORIGINAL_SET_LOGGER(tmp_path, "m", "d", 0)
        assert len(logger.handlers) == 4  # a file and a stream handler per call: every line twice
        for _ in range(2):
            mmsa_run._set_logger(tmp_path, "m", "d", 0)
        assert len(logger.handlers) == 2
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in saved:
            logger.addHandler(handler)


def test_mmsa_results_row_must_match_the_file_columns():
    """MMSA_run reads the results CSV with ``pd.read_csv`` and sets ``df.loc[len(df)] = res``: a row with other
    columns than the file's first writer fails. The patch stands in for exactly these calls."""
    source = inspect.getsource(MMSA.run.MMSA_run.__wrapped__ if hasattr(MMSA.run.MMSA_run, "__wrapped__")
                               else MMSA.run.MMSA_run)
    for call in ("df = pd.read_csv(csv_file)", 'df = pd.DataFrame(columns=["Model"] + criterions)',
                 "df.loc[len(df)] = res", "df.to_csv(csv_file, index=None)", "result = _run(args, num_workers"):
        assert call in source, f"MMSA_run no longer does {call!r}: review the results patches"
    frame = pd.DataFrame(columns=["Model", "Loss"])
    with pytest.raises(ValueError, match="mismatched columns"):
        frame.loc[len(frame)] = ["EMT-DLFR", (1.0, 0.0), (2.0, 0.0)]
    assert isinstance(mmsa_run.pd.DataFrame(columns=["Model", "Loss"]), _ResultsRows)


def test_mmsa_test_loads_loosely(monkeypatch, tmp_path):
    """MMSA's MMSA_test loads weights with strict=False: a checkpoint lacking keys would predict with random
    weights. The original is called with a model that records how it is asked to load."""

    class Loaded(Exception):
        pass

    class Recorder:
        def __init__(self, args):
            pass

        def load_state_dict(self, state, strict=True):
            raise Loaded(strict)

    sample = tmp_path / "sample.pkl"
    sample.write_bytes(pickle.dumps({"text": np.zeros((4, 8)), "audio": np.zeros((3, 5)),
                                     "vision": np.zeros((2, 7))}))
    monkeypatch.setattr(mmsa_run, "AMIO", Recorder)
    monkeypatch.setattr(mmsa_run, "torch", patches._Delegate(torch, load=lambda *a, **k: {}))
    with pytest.raises(Loaded) as loaded:
        inference._ORIGINAL_MMSA_TEST({"model_name": "tfn"}, "weights.pth", str(sample), gpu_id=-1)
    assert loaded.value.args == (False,)
    assert MMSA.MMSA_test is mmsa_run.MMSA_test is inference.mmsa_test


def test_supported_models_lists_ours_once():
    mmsa_emt.register()
    assert mmsa_run.SUPPORTED_MODELS.count("EMT-DLFR") == 1
    assert {"TFN", "MISA", "Self_MM", "MMIM"} <= set(mmsa_run.SUPPORTED_MODELS)


def test_mmsa_dataset_knows_three_datasets():
    assert mmsa_data.MMDataset is not mmsa_data._MMDataset  # the name data.py holds is MMSA's own
    with pytest.raises(KeyError, match="avec2019"):
        mmsa_data.MMDataset(EasyDict(dataset_name="avec2019"), mode="train")


def test_mmsa_metrics_know_three_datasets():
    with pytest.raises(KeyError, match="(?i)avec2019"):
        patches._ORIGINAL_GET_METICS(MetricsTop("regression"), "avec2019")
    assert callable(MetricsTop("regression").getMetics("avec2019"))


def test_torch_refuses_the_verbose_mmsa_passes():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(TypeError, match="verbose"):
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, verbose=True)
    for patch in PATCHES:
        if patch.target.endswith(".ReduceLROnPlateau"):
            owner, _ = patches._owner(patch.target)
            assert "verbose=True" in inspect.getsource(owner), patch.target
            current(patch.target)(optimizer, mode="min", verbose=True)  # ours accepts it


def test_mmsa_misa_projects_768_wide_text():
    source = inspect.getsource(MMSA_MISA.__init__)
    assert "nn.Linear(in_features=768" in source
    alignment = inspect.getsource(MMSA_MISA.alignment)  # audio and vision packed with the text's token counts
    assert "lengths = mask_len" in alignment and "self.extract_features(visual, lengths" in alignment


def test_mmsa_tfr_net_asks_for_bert_base():
    assert inspect.signature(MMSA_BertTextEncoder).parameters["pretrained"].default == "bert-base-uncased"
    call = next(line for line in inspect.getsource(MMSA_TFR_NET.__init__).splitlines() if "BertTextEncoder(" in line)
    assert "pretrained" not in call, "MMSA's TFR-Net passes the encoder now: review mends._TFRNet"


def test_mmsa_datasets_unpickle_through_the_module_pickle(workspace, monkeypatch):
    """MMSA's own loader unpickles the whole feature file once per split, through ``MMSA.data_loader.pickle``."""
    import os

    args = trial_args("EMT-DLFR", "mosi", workspace("mosi"))
    target, reads, real = os.path.realpath(args["featurePath"]), [], pickle.load

    def counting_load(file, *a, **k):
        reads.append(os.path.realpath(file.name))
        return real(file, *a, **k)

    monkeypatch.setattr(pickle, "load", counting_load)
    mmsa_data._mmsa_data_loader(args, 0)
    assert reads.count(target) == 3
