"""``authors_training`` and ``last_partial_group="drop"``: the authors' training semantics where a default run
differs from them (docs/differences.md).

The oracle below restates, in a few lines, the accumulation loop of the authors' trainer
(trains/missingTask/EMT_DLFR.py of GitHub sunlicai/EMT-DLFR): ``zero_grad`` at the start of each group of
``update_epochs`` mini-batches, the summed gradients stepped only when a group is full, so an epoch's last partial
group is never stepped and its gradients are cleared by the next epoch's first ``zero_grad``.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from conftest import random_batch
from MMSA import MMSA_run

import mmsa_emt.mmsa_compat as mmsa_compat
from mmsa_emt import EMTDLFR, LossWeights, compute_loss
from mmsa_emt.objective import TwoViewBatch
from mmsa_emt.trainer import OptimConfig, SpeedConfig, build_optimizer, fit, train_one_epoch

N_BATCHES, UPDATE_EVERY, EPOCHS = 7, 3, 2  # two full groups and a partial one of 1 mini-batch per epoch
LEARNING_RATES = OptimConfig(lr_bert=1e-3, lr_audio=2e-3, lr_vision=3e-3, lr_other=4e-3, wd_bert=0.1, wd_audio=0.2,
                             wd_vision=0.3, wd_other=0.4)


def authors_epoch(model: EMTDLFR, batches: Iterable[TwoViewBatch], optimizer: torch.optim.Optimizer,
                  weights: LossWeights, update_epochs: int) -> None:
    """The authors' training loop for one epoch, restated over our ``compute_loss`` (the oracle)."""
    model.train()
    left_epochs = update_epochs
    for batch in batches:
        if left_epochs == update_epochs:
            optimizer.zero_grad(set_to_none=False)  # their PyTorch 1.7 zeroes the gradients in place
        left_epochs -= 1
        loss = compute_loss(model, batch, weights).total
        loss.backward()
        if not left_epochs:
            optimizer.step()
            left_epochs = update_epochs
    if not left_epochs:  # never true here: left_epochs was reset after the last full group
        optimizer.step()


def trained(tiny_config, epoch_fn) -> EMTDLFR:
    """A tiny model, with dropout on, after EPOCHS epochs of ``epoch_fn(model, batches, optimizer, epoch)``."""
    torch.manual_seed(0)
    model = EMTDLFR(tiny_config(attn_dropout=0.2, ff_dropout=0.1, post_fusion_dropout=0.2))
    optimizer = build_optimizer(model, LEARNING_RATES)
    batches = [random_batch(3, seed=i) for i in range(N_BATCHES)]
    for epoch in range(EPOCHS):
        torch.manual_seed(100 + epoch)  # the same dropout masks for both loops
        epoch_fn(model, batches, optimizer, epoch)
    return model


def ours(last_partial_group: str):
    def run(model, batches, optimizer, epoch):
        train_one_epoch(model, batches, optimizer, LossWeights(), update_every=UPDATE_EVERY, progress=False,
                        speed=SpeedConfig(trim_padding=False), last_partial_group=last_partial_group)
    return run


def test_drop_gives_bit_identical_weights_to_the_authors_loop_and_step_does_not(tiny_config):
    reference = trained(tiny_config, lambda m, b, o, e: authors_epoch(m, b, o, LossWeights(), UPDATE_EVERY))
    dropped = trained(tiny_config, ours("drop"))
    stepped = trained(tiny_config, ours("step"))
    names = [name for name, p in reference.named_parameters() if p.requires_grad]
    params = [dict(m.named_parameters()) for m in (reference, dropped, stepped)]
    different = [n for n in names if not torch.equal(params[0][n], params[1][n])]
    assert different == [], f"not bit-identical to the authors' loop: {different[:5]}"
    assert not any(torch.equal(params[0][n], params[2][n]) for n in names if n.startswith("emt."))


def count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    calls: list[int] = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    return calls


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize("n_batches,update_every,steps", [(7, 3, 2), (6, 3, 2), (4, 1, 4), (3, 3, 1)])
def test_drop_steps_only_full_groups_and_leaves_no_gradient(tiny_config, sized, n_batches, update_every, steps):
    model = EMTDLFR(tiny_config())
    optimizer = build_optimizer(model, OptimConfig())
    calls = count_steps(optimizer)
    batches = [random_batch(3, seed=i) for i in range(n_batches)]
    result = train_one_epoch(model, batches if sized else iter(batches), optimizer, LossWeights(),
                             update_every=update_every, progress=False, last_partial_group="drop")
    assert len(calls) == steps
    assert all(p.grad is None for p in model.parameters())  # the partial group's gradients discarded
    assert result.preds.numel() == 3 * n_batches  # its mini-batches still count in the epoch's results


@pytest.mark.parametrize("sized", [True, False])
def test_drop_with_fewer_batches_than_a_group_is_an_error_not_an_epoch_without_a_step(tiny_config, sized):
    model = EMTDLFR(tiny_config())
    optimizer = build_optimizer(model, OptimConfig())
    calls = count_steps(optimizer)
    batches = [random_batch(3, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match="2 mini-batches, fewer than update_epochs=4.*never step"):
        train_one_epoch(model, batches if sized else iter(batches), optimizer, LossWeights(), update_every=4,
                        progress=False, last_partial_group="drop")
    assert calls == []


def test_an_unknown_last_partial_group_is_refused_before_the_first_batch(tiny_config, tmp_path):
    model = EMTDLFR(tiny_config())
    optimizer = build_optimizer(model, OptimConfig())
    never = iter(())
    with pytest.raises(ValueError, match="last_partial_group='skip' is not one of"):
        fit(model, never, never, optimizer=optimizer, weights=LossWeights(), metric_fn=lambda p, t: {},
            save_path=tmp_path / "best.pth", progress=False, last_partial_group="skip")


@pytest.mark.parametrize("choice,steps", [("drop", 2 * 2), ("step", 2 * 3)])
def test_fit_passes_the_choice_to_every_epoch(tiny_config, tmp_path, choice, steps):
    model = EMTDLFR(tiny_config())
    optimizer = build_optimizer(model, OptimConfig())
    calls = count_steps(optimizer)
    batches = [random_batch(3, seed=i) for i in range(7)]
    fit(model, batches, batches[:2], optimizer=optimizer, weights=LossWeights(), metric_fn=lambda p, t: {},
        max_epochs=2, early_stop=5, update_every=3, save_path=tmp_path / "best.pth", progress=False,
        last_partial_group=choice)
    assert len(calls) == steps


class _Stop(Exception):
    pass


@pytest.mark.parametrize("authors_training,precision,expected", [
    (True, "bf16", ("fp32", "drop")), (True, "auto", ("fp32", "drop")), (False, "bf16", ("bf16", "step")),
    (False, "fp32", ("fp32", "step"))])
def test_authors_training_reaches_the_trainer_from_the_config(workspace, tmp_path, monkeypatch, caplog,
                                                              authors_training, precision, expected):
    seen = {}

    def recorder(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(mmsa_compat, "fit", recorder)
    monkeypatch.setattr(mmsa_compat, "auto_precision", lambda device: "bf16")  # as on a GPU or an AMX CPU
    config = workspace(common={"authors_training": authors_training, "precision": precision})
    with caplog.at_level("INFO", logger="MMSA"), pytest.raises(_Stop):
        MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[1], gpu_ids=[0], num_workers=0,
                 model_save_dir=tmp_path / "models", res_save_dir=tmp_path / "results", log_dir=tmp_path / "logs")
    assert (seen["speed"].precision, seen["last_partial_group"]) == expected
    logged = caplog.text
    assert (f"precision {expected[0]} on cpu" in logged) and (("authors_training: fp32" in logged) == authors_training)


@pytest.mark.parametrize("value", ["true", 1, None])
def test_authors_training_must_be_a_boolean(workspace, tmp_path, value):
    config = workspace(common={"authors_training": value})
    with pytest.raises(ValueError, match=f"authors_training must be true or false, got {value!r}"):
        MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[1], gpu_ids=[0], num_workers=0,
                 model_save_dir=tmp_path / "models", res_save_dir=tmp_path / "results", log_dir=tmp_path / "logs")


def test_update_every_below_one_is_refused(tiny_config):
    model = EMTDLFR(tiny_config())
    with pytest.raises(ValueError, match="update_every=0"):
        train_one_epoch(model, [random_batch(3)], build_optimizer(model, OptimConfig()), LossWeights(),
                        update_every=0, progress=False)
