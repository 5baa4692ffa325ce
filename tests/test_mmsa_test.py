"""MMSA_test on EMT-DLFR weights: strict loading, unreadable files named, padded samples read up to their lengths."""

import pickle
from pathlib import Path

import MMSA
import MMSA.run as mmsa_run
import numpy as np
import pytest
import torch
from conftest import FEATURE_FILES

import mmsa_emt  # noqa: F401  (registers the mends)
from mmsa_emt.mmsa.config import load_config
from mmsa_emt.mmsa.inference import _ORIGINAL_MMSA_TEST, mmsa_test
from mmsa_emt.mmsa.models import AMIO, CheckpointError


def _split(tmp_path: Path) -> dict:
    with open(tmp_path / "dataset" / FEATURE_FILES["mosi"], "rb") as f:
        return pickle.load(f)["test"]


def _padded_index(test: dict) -> int:
    """A test sample whose audio and vision are both padded, and whose last real frames are not all zero."""
    for i, (la, lv) in enumerate(zip(test["audio_lengths"], test["vision_lengths"], strict=True)):
        if la < test["audio"].shape[1] and lv < test["vision"].shape[1] \
                and test["audio"][i][la - 1].any() and test["vision"][i][lv - 1].any():
            return i
    raise AssertionError("no padded sample in the synthetic test split")


def _sample(test: dict, i: int, *, lengths: bool = True, trim: bool = False) -> dict:
    la, lv = int(test["audio_lengths"][i]), int(test["vision_lengths"][i])
    sample = {"text": test["text"][i], "text_bert": test["text_bert"][i],
              "audio": test["audio"][i][:la] if trim else test["audio"][i],
              "vision": test["vision"][i][:lv] if trim else test["vision"][i]}
    if lengths:
        sample.update(audio_lengths=la, vision_lengths=lv)
    return sample


def _write(path: Path, sample: dict) -> str:
    path.write_bytes(pickle.dumps(sample))
    return str(path)


@pytest.fixture
def saved(workspace, tmp_path):
    """(args, weights path, test split): an untrained EMT-DLFR's weights saved as MMSA_run saves them."""
    config = workspace("mosi")
    args = load_config("EMT-DLFR", "mosi", config)
    test = _split(tmp_path)
    args.update(feature_dims=[768, test["audio"].shape[2], test["vision"].shape[2]], device="cpu")
    torch.manual_seed(0)
    weights = tmp_path / "emt-dlfr-mosi-seed1.pth"
    torch.save(AMIO(args).state_dict(), weights)
    return args, weights, test


def test_mmsa_import_gets_the_mended_function():
    from MMSA import MMSA_test

    assert MMSA_test is mmsa_test and MMSA.MMSA_test is mmsa_test and mmsa_run.MMSA_test is mmsa_test


def test_padded_sample_with_its_lengths_predicts_as_the_trimmed_sample(saved, tmp_path):
    args, weights, test = saved
    i = _padded_index(test)
    padded = mmsa_test(dict(args), str(weights), _write(tmp_path / "padded.pkl", _sample(test, i)), gpu_id=-1)
    trimmed = mmsa_test(dict(args), str(weights),
                        _write(tmp_path / "trimmed.pkl", _sample(test, i, lengths=False, trim=True)), gpu_id=-1)
    assert float(padded) == pytest.approx(float(trimmed), abs=1e-6)

    model = AMIO(args)  # the same through the model with the lengths, as training and evaluation read them
    model.load_state_dict(torch.load(weights))
    model.eval()
    as_batch = lambda key: torch.from_numpy(np.asarray(test[key][i])).float()[None]  # noqa: E731
    with torch.no_grad():
        expected = model(as_batch("text_bert"), as_batch("audio"), as_batch("vision"),
                         torch.tensor([test["audio_lengths"][i]]), torch.tensor([test["vision_lengths"][i]]))["M"]
        padding_read = model(as_batch("text_bert"), as_batch("audio"), as_batch("vision"),
                             torch.tensor([test["audio"].shape[1]]), torch.tensor([test["vision"].shape[1]]))["M"]
    assert float(padded) == pytest.approx(expected.item(), abs=1e-6)
    assert abs(padding_read.item() - expected.item()) > 1e-4  # reading the padding would change the number


def test_padded_sample_without_lengths_is_refused(saved, tmp_path):
    args, weights, test = saved
    path = _write(tmp_path / "padded.pkl", _sample(test, _padded_index(test), lengths=False))
    with pytest.raises(ValueError, match=r"padded\.pkl.*frames of 'audio' are all zeros.*'audio_lengths'"):
        mmsa_test(dict(args), str(weights), path, gpu_id=-1)
    # MMSA's own function, bound before `import mmsa_emt`, reaches the model without lengths: refused there
    with pytest.raises(ValueError, match=r"last frame of 'audio' is all zeros.*audio_lengths"):
        _ORIGINAL_MMSA_TEST(dict(args), str(weights), path, gpu_id=-1)


@pytest.mark.parametrize("lengths", [{"audio_lengths": 99}, {"vision_lengths": 2.5}, {"audio_lengths": [3, 4]}])
def test_impossible_lengths_are_named(saved, tmp_path, lengths):
    args, weights, test = saved
    path = _write(tmp_path / "s.pkl", {**_sample(test, 0), **lengths})
    key = next(iter(lengths))
    with pytest.raises(ValueError, match=rf"s\.pkl: '{key}' must be one whole number of frames"):
        mmsa_test(dict(args), str(weights), path, gpu_id=-1)


def test_checkpoint_with_missing_or_unexpected_keys_is_refused(saved, tmp_path):
    args, weights, test = saved
    sample = _write(tmp_path / "s.pkl", _sample(test, 0))
    state = torch.load(weights)
    dropped = sorted(k for k in state if ".head." in k or k.startswith("Model.head"))[:2] or sorted(state)[:2]
    for key in dropped:
        del state[key]
    state["Model.extra.weight"] = torch.zeros(2)
    other = tmp_path / "other-layout.pth"
    torch.save(state, other)
    with pytest.raises(CheckpointError, match=r"other-layout\.pth does not fit.*2 missing keys \(" +
                       r".*".join(map(lambda k: k.replace(".", r"\."), dropped)) + r"\).*1 unexpected keys "
                       r"\(Model\.extra\.weight\)"):
        mmsa_test(dict(args), str(weights.with_name("other-layout.pth")), sample, gpu_id=-1)
    # MMSA's own call asks for strict=False: still refused
    with pytest.raises(CheckpointError, match=r"missing keys"):
        _ORIGINAL_MMSA_TEST(dict(args), str(other), sample, gpu_id=-1)

    unprefixed = tmp_path / "unprefixed.pth"
    torch.save({k.removeprefix("Model."): v for k, v in torch.load(weights).items()}, unprefixed)
    with pytest.raises(CheckpointError, match=r"unprefixed\.pth.*lack the 'Model\.' prefix"):
        mmsa_test(dict(args), str(unprefixed), sample, gpu_id=-1)


def test_checkpoint_of_another_configuration_is_refused(saved, tmp_path):
    args, weights, test = saved
    sample = _write(tmp_path / "s.pkl", _sample(test, 0))
    wider = {**args, "post_fusion_dim": 24}
    with pytest.raises(CheckpointError, match=r"emt-dlfr-mosi-seed1\.pth does not fit this model's configuration"):
        mmsa_test(wider, str(weights), sample, gpu_id=-1)


def test_checkpoint_of_another_model_is_refused(saved, tmp_path, workspace):
    from mmsa_emt.mmsa.config import trial_args

    args, _, test = saved
    tfn = trial_args("TFN", "mosi", workspace("mosi"))
    tfn.update(feature_dims=[16, test["audio"].shape[2], test["vision"].shape[2]], use_bert=False)
    tfn_weights = tmp_path / "tfn-mosi.pth"
    torch.save(AMIO(tfn).state_dict(), tfn_weights)
    with pytest.raises(CheckpointError, match=r"tfn-mosi\.pth does not fit this EMT-DLFR model: \d+ missing keys"):
        mmsa_test(dict(args), str(tfn_weights), _write(tmp_path / "s.pkl", _sample(test, 0)), gpu_id=-1)


@pytest.mark.parametrize("kind", ["text", "truncated", "empty", "pickle", "numpy"])
def test_unreadable_weights_file_is_named(saved, tmp_path, kind):
    args, weights, test = saved
    bad = tmp_path / f"bad-{kind}.pth"
    if kind == "text":
        bad.write_text("not a checkpoint")
    elif kind == "truncated":
        bad.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "pickle":
        bad.write_bytes(pickle.dumps({"Model.x": np.zeros(2)}))
    else:
        torch.save({"Model.x": np.zeros(2)}, bad)
    sample = _write(tmp_path / "s.pkl", _sample(test, 0))
    for call in (mmsa_test, _ORIGINAL_MMSA_TEST):  # ours, and MMSA's own through the mended torch.load
        with pytest.raises(CheckpointError, match=rf"bad-{kind}\.pth") as caught:
            call(dict(args), str(bad), sample, gpu_id=-1)
        assert "weights_only=False" not in str(caught.value)
        expected = {"empty": "is empty", "numpy": "objects other than tensors"}.get(kind, "not a \\(complete\\)")
        assert caught.match(expected)


def test_unreadable_sample_file_is_named(saved, tmp_path):
    args, weights, test = saved
    bad = tmp_path / "sample.pkl"
    bad.write_text("not a pickle")
    with pytest.raises(ValueError, match=r"sample\.pkl is not a readable pickle"):
        mmsa_test(dict(args), str(weights), str(bad), gpu_id=-1)
    no_text = {k: v for k, v in _sample(test, 0).items() if k != "text_bert"}
    with pytest.raises(KeyError, match=r"s\.pkl has no 'text_bert'"):
        mmsa_test(dict(args), str(weights), _write(tmp_path / "s.pkl", no_text), gpu_id=-1)
