"""``authors_training`` and ``last_partial_group="drop"``: the authors' training semantics where a default run
differs from them (docs/differences.md).

The oracle below restates, in a few lines, the accumulation loop of the authors' trainer
(trains/missingTask/EMT_DLFR.py of GitHub sunlicai/EMT-DLFR): ``zero_grad`` at the start of each group of
``update_epochs`` mini-batches, the summed gradients stepped only when a group is full, so an epoch's last partial
group is never stepped and its gradients are cleared by the next epoch's first ``zero_grad``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import pytest
import torch
from conftest import random_batch
from easydict import EasyDict
from MMSA import MMSA_run
from test_reference_parity import reference_to_ours

import mmsa_emt.mmsa.trainer as mmsa_trainer
from mmsa_emt import DLFR, LossWeights, compute_loss
from mmsa_emt.dlfr import TwoViewBatch, emt_dlfr
from mmsa_emt.fast import config as fast_config
from mmsa_emt.mmsa.config import model_config_from_args, optim_config_from_args
from mmsa_emt.synthetic import write_tiny_bert
from mmsa_emt.trainer import OptimConfig, SpeedConfig, build_optimizer, fit, train_one_epoch

N_BATCHES, UPDATE_EVERY, EPOCHS = 7, 3, 2  # two full groups and a partial one of 1 mini-batch per epoch
LEARNING_RATES = OptimConfig(lr_bert=1e-3, lr_audio=2e-3, lr_vision=3e-3, lr_other=4e-3, wd_bert=0.1, wd_audio=0.2,
                             wd_vision=0.3, wd_other=0.4)


def authors_epoch(model: DLFR, batches: Iterable[TwoViewBatch], optimizer: torch.optim.Optimizer,
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


def trained(tiny_config, epoch_fn) -> DLFR:
    """A tiny model, with dropout on, after EPOCHS epochs of ``epoch_fn(model, batches, optimizer, epoch)``."""
    torch.manual_seed(0)
    model = emt_dlfr(tiny_config(attn_dropout=0.2, ff_dropout=0.1, post_fusion_dropout=0.2))
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
    model = emt_dlfr(tiny_config())
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
    model = emt_dlfr(tiny_config())
    optimizer = build_optimizer(model, OptimConfig())
    calls = count_steps(optimizer)
    batches = [random_batch(3, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match="2 mini-batches, fewer than update_epochs=4.*never step"):
        train_one_epoch(model, batches if sized else iter(batches), optimizer, LossWeights(), update_every=4,
                        progress=False, last_partial_group="drop")
    assert calls == []


def test_an_unknown_last_partial_group_is_refused_before_the_first_batch(tiny_config, tmp_path):
    model = emt_dlfr(tiny_config())
    optimizer = build_optimizer(model, OptimConfig())
    never = iter(())
    with pytest.raises(ValueError, match="last_partial_group='skip' is not one of"):
        fit(model, never, never, optimizer=optimizer, weights=LossWeights(), metric_fn=lambda p, t: {},
            save_path=tmp_path / "best.pth", progress=False, last_partial_group="skip")


@pytest.mark.parametrize("choice,steps", [("drop", 2 * 2), ("step", 2 * 3)])
def test_fit_passes_the_choice_to_every_epoch(tiny_config, tmp_path, choice, steps):
    model = emt_dlfr(tiny_config())
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

    monkeypatch.setattr(mmsa_trainer, "fit", recorder)
    monkeypatch.setattr(fast_config, "auto_precision", lambda device: "bf16")  # as on a GPU or an AMX CPU
    config = workspace(common={"authors_training": authors_training, "precision": precision})
    with caplog.at_level("INFO", logger="MMSA"), pytest.raises(_Stop):
        MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[1], gpu_ids=[], num_workers=0,
                 model_save_dir=tmp_path / "models", res_save_dir=tmp_path / "results", log_dir=tmp_path / "logs")
    assert (seen["speed"].precision, seen["last_partial_group"]) == expected
    logged = caplog.text
    assert (f"precision {expected[0]} on cpu" in logged) and (("authors_training: fp32" in logged) == authors_training)


@pytest.mark.parametrize("value", ["true", 1, None])
def test_authors_training_must_be_a_boolean(workspace, tmp_path, value):
    config = workspace(common={"authors_training": value})
    with pytest.raises(ValueError, match=f"config key 'authors_training' is {value!r} .*true or false"):
        MMSA_run("EMT-DLFR", "mosi", config_file=str(config), seeds=[1], gpu_ids=[], num_workers=0,
                 model_save_dir=tmp_path / "models", res_save_dir=tmp_path / "results", log_dir=tmp_path / "logs")


def test_update_every_below_one_is_refused(tiny_config):
    model = emt_dlfr(tiny_config())
    with pytest.raises(ValueError, match="update_every=0"):
        train_one_epoch(model, [random_batch(3)], build_optimizer(model, OptimConfig()), LossWeights(),
                        update_every=0, progress=False)


# --------------------------------------------------------------------------- the authors' own trainer class
REFERENCE = os.environ.get("EMT_DLFR_REFERENCE")
REFERENCE_ARGS = dict(
    need_data_aligned=False, use_finetune=True, feature_dims=[32, 5, 7], a_lstm_hidden_size=8, v_lstm_hidden_size=8,
    a_lstm_layers=1, v_lstm_layers=1, a_lstm_dropout=0.0, v_lstm_dropout=0.0, text_out=32, audio_out=4, video_out=6,
    d_model=16, fusion_layers=2, heads=2, learnable_pos_emb=False, emb_dropout=0.0, attn_dropout=0.0, ff_dropout=0.0,
    ff_expansion=4, mpu_share=True, modality_share=True, layer_share=True, attn_act_fn="tanh",
    gmc_tokens_pred_dim=8, text_pred_dim=8, audio_pred_dim=2, video_pred_dim=3, post_fusion_dim=8,
    post_fusion_dropout=0.0, model_name="emt-dlfr", learning_rate_bert=1e-3, learning_rate_audio=2e-3,
    learning_rate_video=3e-3, learning_rate_other=4e-3, weight_decay_bert=0.1, weight_decay_audio=0.2,
    weight_decay_video=0.3, weight_decay_other=0.4, loss_attra_weight=1.0, loss_recon_weight=1.0,
    recon_loss="SmoothL1Loss")


def mmsa_batch(batch: TwoViewBatch) -> dict:
    """A ``TwoViewBatch`` as the batch dict of MMSA's (and the authors') data loader with data_missing on."""
    audio_mask = (torch.arange(batch.audio.shape[1])[None] < batch.audio_lengths[:, None]).float()
    vision_mask = (torch.arange(batch.vision.shape[1])[None] < batch.vision_lengths[:, None]).float()
    return dict(text=batch.text, text_m=batch.text_m, text_missing_mask=batch.text[:, 1] - batch.text_dropped,
                audio=batch.audio, audio_m=batch.audio_m, audio_lengths=batch.audio_lengths, audio_mask=audio_mask,
                audio_missing_mask=audio_mask - batch.audio_dropped, vision=batch.vision, vision_m=batch.vision_m,
                vision_lengths=batch.vision_lengths, vision_mask=vision_mask,
                vision_missing_mask=vision_mask - batch.vision_dropped, labels={"M": batch.labels.reshape(-1, 1)})


@pytest.fixture
def authors_code(tmp_path, monkeypatch):
    """The authors' model and trainer classes from EMT_DLFR_REFERENCE, over a tiny BERT without dropout (their
    encoder loads it from <data_root>/pretrained_berts/bert_en)."""
    if not REFERENCE:
        pytest.skip("set EMT_DLFR_REFERENCE to a checkout of sunlicai/EMT-DLFR")
    bert = write_tiny_bert(tmp_path / "data_root" / "pretrained_berts" / "bert_en")
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # no random stream to match
    (bert / "config.json").write_text(json.dumps(config))
    monkeypatch.syspath_prepend(REFERENCE)
    import config.get_data_root as data_root  # the reference's own modules

    monkeypatch.setattr(data_root, "data_root", str(tmp_path / "data_root"))
    import models.subNets.BertTextEncoder as encoder
    from models.missingTask.EMT_DLFR import EMT_DLFR as AuthorsModel
    from trains.missingTask.EMT_DLFR import EMT_DLFR as AuthorsTrainer

    monkeypatch.setattr(encoder, "data_root", str(tmp_path / "data_root"))  # bound at its import
    return AuthorsModel, AuthorsTrainer, bert


class _AMIO(torch.nn.Module):
    """MMSA's model wrapper as the authors' trainer expects it (``model.Model``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.Model = model

    def forward(self, *args):
        return self.Model(*args)


def test_drop_trains_like_the_authors_trainer_class(authors_code, tmp_path):
    """Two epochs of the authors' own ``do_train`` (7 mini-batches each, update_epochs=3, their Adam) and two of
    ours from the same weights: with ``drop`` the two models then predict alike (float rounding apart: the two
    networks compute in another order); with ``step`` ours has taken two more Adam steps and predicts otherwise.
    Their loop runs until early stopping: a validation metric that never improves ends it after ``early_stop``
    epochs. Dropout is off in both (their random stream is not ours: docs/differences.md)."""
    AuthorsModel, AuthorsTrainer, bert = authors_code
    args = EasyDict({**REFERENCE_ARGS, "pretrained": str(bert), "language": "en", "fusion_method": None,
                     "train_mode": "regression", "datasetName": "mosi", "KeyEval": "never improves",
                     "update_epochs": UPDATE_EVERY, "early_stop": EPOCHS, "gpu_ids": [], "device": torch.device("cpu"),
                     "seed": 1, "seeds": [1], "num_seeds": 1, "model_save_path": str(tmp_path / "unused.pth")})
    torch.manual_seed(0)
    theirs = AuthorsModel(args)
    start = {reference_to_ours(k): v.clone() for k, v in theirs.state_dict().items() if reference_to_ours(k)}
    batches = [random_batch(3, seed=i) for i in range(N_BATCHES)]
    held_out = random_batch(5, seed=99)

    trainer = AuthorsTrainer(args)
    trainer.metrics = lambda pred, true: {"never improves": 0.0}  # 'max' from their best of 0: never better
    loaders = {"train": [mmsa_batch(b) for b in batches], "valid": [mmsa_batch(b) for b in batches[:2]]}
    trainer.do_train(_AMIO(theirs), loaders)  # a valid loader of one batch would divide by 0 in their logging
    theirs.eval()
    with torch.no_grad():
        expected = theirs((held_out.text, held_out.text_m), (held_out.audio, held_out.audio_m, held_out.audio_lengths),
                          (held_out.vision, held_out.vision_m, held_out.vision_lengths))["pred_m"].reshape(-1)

    predictions = {}
    for choice in ("drop", "step"):
        ours_model = emt_dlfr(model_config_from_args(args))
        ours_model.load_state_dict(start, strict=True)
        optimizer = build_optimizer(ours_model, optim_config_from_args(args))
        for _ in range(EPOCHS):
            train_one_epoch(ours_model, batches, optimizer, LossWeights(), update_every=UPDATE_EVERY,
                            progress=False, last_partial_group=choice)
        ours_model.eval()
        with torch.no_grad():
            predictions[choice] = compute_loss(ours_model, held_out, LossWeights()).pred
    moved = (predictions["drop"] - expected).abs().max().item()
    assert moved < 1e-4, f"ours with drop predicts {moved:.2e} away from the authors' trainer"
    assert (predictions["step"] - expected).abs().max().item() > 100 * max(moved, 1e-6)
