"""Optimizer groups, gradient accumulation, early stopping and checkpoints of the framework-free trainer."""


import pytest
import torch
from conftest import random_batch

from mmsa_emt import LossWeights
from mmsa_emt.dlfr import emt_dlfr
from mmsa_emt.trainer import OptimConfig, build_optimizer, fit, train_one_epoch


def test_optimizer_groups_follow_the_config(tiny_config):
    model = emt_dlfr(tiny_config())
    config = OptimConfig(lr_bert=1e-5, lr_audio=2e-3, lr_vision=3e-4, lr_other=4e-3, wd_bert=0.1, wd_audio=0.2,
                         wd_vision=0.3, wd_other=0.4)
    groups = {g["name"]: g for g in build_optimizer(model, config).param_groups}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "bert": (1e-5, 0.1), "bert_no_decay": (1e-5, 0.0), "audio": (2e-3, 0.2), "vision": (3e-4, 0.3),
        "other": (4e-3, 0.4)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in groups["bert_no_decay"]["params"]]
    assert no_decay and all("bias" in n or "LayerNorm" in n for n in no_decay)
    assert all(names[id(p)].startswith("net.audio_encoder.") for p in groups["audio"]["params"])
    assert any(names[id(p)].startswith("net.emt.") for p in groups["other"]["params"])
    assert any(names[id(p)].startswith("restoration.") for p in groups["other"]["params"])


def test_fused_adam_is_the_default_on_cpu_and_updates_like_per_tensor_adam(tiny_config):
    """A training step with the fused optimizer (the default here) lands on the same weights as with Adam's
    per-tensor loop, in every group (its own learning rate and weight decay). One step: after it, rounding
    differences would be amplified by the parameters whose gradient is pure rounding noise (BERT's key bias)."""
    torch.manual_seed(0)
    models = [emt_dlfr(tiny_config()), emt_dlfr(tiny_config())]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    config = OptimConfig(lr_bert=1e-3, lr_audio=2e-3, lr_vision=3e-3, lr_other=4e-3, wd_bert=0.1, wd_audio=0.2,
                         wd_vision=0.3, wd_other=0.4)
    fused, loop = build_optimizer(models[0], config), build_optimizer(models[1], config, fused=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    batches = [random_batch(3)]
    for model, optimizer in zip(models, (fused, loop)):
        torch.manual_seed(1)
        train_one_epoch(model, batches, optimizer, LossWeights(), progress=False)
    trainable = [name for name, p in models[0].named_parameters() if p.requires_grad]
    moved = [name for (name, a), before in zip(models[0].named_parameters(), start) if not torch.equal(a, before)]
    assert moved == trainable  # every trainable parameter was updated, nothing else
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("n_batches,update_every,steps", [(7, 3, 3), (6, 3, 2), (4, 1, 4), (2, 4, 1)])
def test_gradient_accumulation_steps_the_last_partial_group(tiny_config, n_batches, update_every, steps):
    model = emt_dlfr(tiny_config())
    optimizer = build_optimizer(model, OptimConfig())
    calls = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    batches = [random_batch(3, seed=i) for i in range(n_batches)]
    train_one_epoch(model, batches, optimizer, LossWeights(), update_every=update_every, progress=False)
    assert len(calls) == steps


def test_fit_stops_early_saves_the_best_and_loads_it_back(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = emt_dlfr(tiny_config())
    train = [random_batch(4, seed=i) for i in range(2)]
    valid = [random_batch(4, seed=10)]
    path = tmp_path / "best.pth"
    metric = lambda p, y: {"MAE": float((p - y).abs().mean())}  # noqa: E731
    result = fit(model, train, valid, optimizer=build_optimizer(model, OptimConfig()), weights=LossWeights(),
                 metric_fn=metric, early_stop=1, max_epochs=4, save_path=path, checkpoint_prefix="Model.",
                 progress=False)
    assert path.is_file() and 1 <= result.best_epoch <= result.epochs <= 4
    assert result.epochs == 4 or result.epochs - result.best_epoch == 1
    saved = torch.load(path)
    assert all(k.startswith("Model.") for k in saved)
    for k, v in model.state_dict().items():
        assert torch.equal(saved["Model." + k], v)
    losses = [h["valid"]["Loss"] for h in result.history]
    assert result.best_value == min(losses)


@pytest.mark.parametrize("scores, reloads", [([3.0, 2.0, 1.0], 0), ([1.0, 2.0, 3.0], 1)])
def test_fit_reloads_the_best_weights_only_when_they_are_not_the_last(tiny_config, tmp_path, monkeypatch, scores,
                                                                       reloads):
    """Validation scores (lower is better) that improve every epoch leave the last weights, already the best, in
    place; otherwise the first epoch's weights come back from the checkpoint."""
    import mmsa_emt.trainer as trainer

    torch.manual_seed(0)
    model = emt_dlfr(tiny_config())
    calls, valid_scores = [], iter(scores)
    metric = lambda p, y: {"Score": next(valid_scores)} if len(p) == 5 else {}  # noqa: E731  (valid: 5 samples)
    load = torch.load
    monkeypatch.setattr(trainer.torch, "load", lambda *a, **k: calls.append(1) or load(*a, **k))
    path = tmp_path / "best.pth"
    result = fit(model, [random_batch(4, seed=i) for i in range(2)], [random_batch(5, seed=10)],
                 optimizer=build_optimizer(model, OptimConfig()), weights=LossWeights(), metric_fn=metric,
                 key_metric="Score", early_stop=len(scores), max_epochs=len(scores), save_path=path, progress=False)
    assert len(calls) == reloads and result.epochs == len(scores)
    assert result.best_epoch == (len(scores) if reloads == 0 else 1)
    saved = torch.load(path)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_key_metric_that_is_never_a_number_is_a_clear_error(tiny_config, tmp_path):
    """A NaN validation score every epoch (e.g. the correlation of constant predictions) saves nothing: the error
    says so and names the metric, instead of failing to find the checkpoint."""
    model = emt_dlfr(tiny_config())
    with pytest.raises(ValueError, match=r"valid Corr never improved.*nan after 2 epochs.*KeyEval"):
        fit(model, [random_batch(3)], [random_batch(3, seed=1)], optimizer=build_optimizer(model, OptimConfig()),
            weights=LossWeights(), metric_fn=lambda p, y: {"Corr": float("nan")}, key_metric="Corr",
            minimize=False, early_stop=2, max_epochs=5, save_path=tmp_path / "x.pth", progress=False)
    assert not (tmp_path / "x.pth").exists()


def test_unknown_key_metric_lists_the_choices(tiny_config, tmp_path):
    model = emt_dlfr(tiny_config())
    with pytest.raises(KeyError, match="KeyEval='Acc'.*Loss"):
        fit(model, [random_batch(3)], [random_batch(3)], optimizer=build_optimizer(model, OptimConfig()),
            weights=LossWeights(), metric_fn=lambda p, y: {}, key_metric="Acc", save_path=tmp_path / "x.pth",
            progress=False)


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tiny_config, tmp_path, monkeypatch):
    """The checkpoint is written beside its path and renamed over it: a write that fails midway (here: a full
    disk after a few bytes) raises an error naming the file and leaves the last good checkpoint as it was."""
    import mmsa_emt.trainer as trainer

    model, path = emt_dlfr(tiny_config()), tmp_path / "best.pth"
    checkpoint = trainer.BestCheckpoint(path, prefix="Model.")
    checkpoint.save(model)
    good = path.read_bytes()

    def full_disk(state, file):
        file.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.torch, "save", full_disk)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match=r"best\.pth.*No space left.*previous one.*unchanged"):
        checkpoint.save(model)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth"]  # no partial file left behind


def test_background_checkpoint_writes_a_snapshot_and_restores_it_from_memory(tiny_config, tmp_path, monkeypatch):
    """``BestCheckpoint(background=True)`` (fit's choice on CUDA): the file holds the weights as they were at
    ``save``, even though training changes them while the thread writes; ``load_into`` restores them from memory
    (no file read); a failed write is raised by the next ``wait``."""
    import mmsa_emt.trainer as trainer

    model, path = emt_dlfr(tiny_config()), tmp_path / "best.pth"
    saved_state = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = trainer.BestCheckpoint(path, prefix="Model.", background=True)
    checkpoint.save(model)
    with torch.no_grad():  # what the next optimizer steps do while the writer runs
        for p in model.parameters():
            p.add_(1.0)
    checkpoint.wait()
    on_disk = torch.load(path)
    assert on_disk.keys() == {"Model." + k for k in saved_state}
    assert all(torch.equal(on_disk["Model." + k], v) for k, v in saved_state.items())
    monkeypatch.setattr(trainer.torch, "load", lambda *a, **k: pytest.fail("read the file back"))
    checkpoint.load_into(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved_state.items())

    monkeypatch.setattr(trainer.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full")))
    checkpoint.save(model)
    with pytest.raises(OSError, match="best.pth.*disk full"):
        checkpoint.wait()
    checkpoint.wait()  # raised once


def test_fit_with_a_background_checkpoint_returns_with_the_best_weights_on_disk(tiny_config, tmp_path,
                                                                               monkeypatch):
    """fit as on CUDA (checkpoint written by a thread): when it returns the file holds the best epoch's weights,
    which the model holds too (restored from memory: the best epoch was not the last)."""
    import mmsa_emt.trainer as trainer

    original = trainer.BestCheckpoint
    monkeypatch.setattr(trainer, "BestCheckpoint", lambda *a, **k: original(*a, **{**k, "background": True}))
    torch.manual_seed(0)
    model, path, scores = emt_dlfr(tiny_config()), tmp_path / "best.pth", iter([1.0, 2.0, 3.0])
    metric = lambda p, y: {"Score": next(scores)} if len(p) == 5 else {}  # noqa: E731  (valid: 5 samples)
    result = fit(model, [random_batch(4, seed=i) for i in range(2)], [random_batch(5, seed=10)],
                 optimizer=build_optimizer(model, OptimConfig()), weights=LossWeights(), metric_fn=metric,
                 key_metric="Score", early_stop=3, max_epochs=3, save_path=path, progress=False)
    assert result.best_epoch == 1 and result.epochs == 3
    saved = torch.load(path)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
