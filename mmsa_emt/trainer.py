"""Training loop for EMT-DLFR: optimizer groups, one epoch, evaluation, early stopping with best-weight saving.

Framework-free: batches arrive as ``TwoViewBatch`` and metrics through a callable, so MMSA's trainer interface
(``mmsa_emt.mmsa.trainer.EMTDLFRTrainer``) and plain scripts both sit on top of it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .atomic import atomic_file
from .checkpoint import package, state_dict_of
from .dlfr import DLFR, LossOutput, LossWeights, TwoViewBatch, compute_loss
from .fast import SpeedConfig, auto_precision, compile_model  # noqa: F401  (the seam; re-exported)

_log = logging.getLogger(__name__)
MetricFn = Callable[[Tensor, Tensor], dict[str, float]]
NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layernorm.weight", "layernorm.bias")


@dataclass
class OptimConfig:
    """Learning rates and weight decays per parameter group (the authors' config names)."""

    lr_bert: float = 5e-5
    lr_audio: float = 1e-3
    lr_vision: float = 1e-4
    lr_other: float = 1e-3
    wd_bert: float = 1e-3
    wd_audio: float = 1e-2
    wd_vision: float = 1e-3
    wd_other: float = 1e-3


def build_optimizer(model: DLFR, config: OptimConfig, *, fused: bool | None = None) -> torch.optim.Adam:
    """Adam with five groups: BERT with decay, BERT bias/LayerNorm without, audio LSTM, vision LSTM, the rest.

    Asserts that every trainable parameter is in exactly one group. ``fused`` (default: when every parameter is
    on the CPU or CUDA) updates all parameters in a few fused kernels instead of several per tensor: the same
    update rule, several times faster (docs/speed.md).
    """
    groups: dict[str, list[torch.nn.Parameter]] = {"bert": [], "bert_no_decay": [], "audio": [], "vision": [],
                                                   "other": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.removeprefix("net.")  # the network inside its DLFR wrapper
        if name.startswith("text_encoder."):
            groups["bert_no_decay" if any(k in name for k in NO_DECAY) else "bert"].append(param)
        elif name.startswith("audio_encoder."):
            groups["audio"].append(param)
        elif name.startswith("vision_encoder."):
            groups["vision"].append(param)
        else:
            groups["other"].append(param)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == trainable, \
        "every trainable parameter must be in exactly one optimizer group"
    c = config
    settings = {"bert": (c.lr_bert, c.wd_bert), "bert_no_decay": (c.lr_bert, 0.0), "audio": (c.lr_audio, c.wd_audio),
                "vision": (c.lr_vision, c.wd_vision), "other": (c.lr_other, c.wd_other)}
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for params in groups.values() for p in params)
    return torch.optim.Adam([{"params": groups[k], "lr": lr, "weight_decay": wd, "name": k}
                             for k, (lr, wd) in settings.items() if groups[k]], fused=fused or None)


@dataclass
class EpochResult:
    loss: float
    pred_loss: float  # L1 of the incomplete-view prediction alone
    preds: Tensor  # (n,) CPU
    labels: Tensor  # (n,) CPU
    metrics: dict[str, float] = field(default_factory=dict)
    features: dict[str, Tensor] | None = None  # h_l, h_a, h_v, flatten(G) of the incomplete view, if kept


def _progress(batches: Iterable, desc: str, show: bool) -> tqdm:
    total = len(batches) if isinstance(batches, Sized) else None
    hidden = {} if show else {"disable": True}  # shown: tqdm's own rules (TQDM_DISABLE, no bar off a terminal)
    return tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True, **hidden)


def train_one_epoch(model: DLFR, batches: Iterable[TwoViewBatch], optimizer: torch.optim.Optimizer,
                    weights: LossWeights, *, update_every: int = 1, device: torch.device | str = "cpu",
                    desc: str = "train", progress: bool = True, speed: SpeedConfig | None = None,
                    scaler: torch.amp.GradScaler | None = None, last_partial_group: str = "step") -> EpochResult:
    """One pass; gradients accumulate over ``update_every`` mini-batches (summed, as the authors). ``scaler``
    scales the loss for fp16.

    ``last_partial_group``: what happens to the epoch's last group when it has fewer than ``update_every``
    mini-batches: ``"step"`` (default) steps the optimizer on it; ``"drop"`` discards its gradients without a
    step, as the authors' loop does (it steps only full groups; the next epoch's ``zero_grad`` clears the rest).
    Its mini-batches still count in the epoch's loss and predictions, as in theirs. With ``"drop"`` an epoch of
    fewer than ``update_every`` mini-batches would never step: that is an error.
    """
    if last_partial_group not in LAST_PARTIAL_GROUP:
        raise ValueError(f"last_partial_group='{last_partial_group}' is not one of {list(LAST_PARTIAL_GROUP)}")
    if update_every < 1:
        raise ValueError(f"update_every={update_every}: gradients accumulate over at least 1 mini-batch")
    drop = last_partial_group == "drop"
    if drop and isinstance(batches, Sized) and len(batches) < update_every:
        raise ValueError(_never_steps(len(batches), update_every))
    speed = speed or SpeedConfig()
    scaler = scaler or torch.amp.GradScaler(torch.device(device).type, enabled=speed.precision == "fp16")
    model.train()
    total_loss = torch.zeros((), device=device)
    pred_loss = torch.zeros((), device=device)
    preds, labels = [], []
    bar = _progress(batches, desc, progress)
    n_batches = len(bar) if bar.total is not None else None
    optimizer.zero_grad(set_to_none=True)
    i = -1
    for i, batch in enumerate(bar):
        batch = speed.prepare(batch, device)
        with speed.autocast(device):
            out = compute_loss(model, batch, weights)
        scaler.scale(out.total).backward()
        last = not drop and n_batches is not None and i + 1 == n_batches
        if (i + 1) % update_every == 0 or last:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if speed.sync_every_step:
            out.total.item()
        total_loss += out.total.detach()
        pred_loss += out.terms["pred_incomplete"].detach()
        preds.append(out.pred.detach())
        labels.append(batch.labels.reshape(-1))
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{out.total.item():.4f}")
    if drop:
        if 0 < i + 1 < update_every:  # an unsized iterable, found too short only now
            raise ValueError(_never_steps(i + 1, update_every))
        optimizer.zero_grad(set_to_none=True)  # the partial group's gradients, discarded
    elif n_batches is None and (i + 1) % update_every:
        scaler.step(optimizer)  # unsized iterable: flush the last partial group
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return _epoch_result(total_loss, pred_loss, i + 1, preds, labels)


LAST_PARTIAL_GROUP = ("step", "drop")


def _never_steps(n_batches: int, update_every: int) -> str:
    return (f"the epoch has {n_batches} mini-batches, fewer than update_epochs={update_every}: with the last partial "
            "group dropped (authors_training) the optimizer would never step; lower update_epochs or the batch size")


@torch.no_grad()
def evaluate(model: DLFR, batches: Iterable[TwoViewBatch], weights: LossWeights, *,
             device: torch.device | str = "cpu", desc: str = "eval", progress: bool = True,
             keep_features: bool = False, speed: SpeedConfig | None = None) -> EpochResult:
    """Same loss as training, in eval mode; predictions are the incomplete view's."""
    speed = speed or SpeedConfig()
    model.eval()
    total_loss = torch.zeros((), device=device)
    pred_loss = torch.zeros((), device=device)
    preds, labels, feats = [], [], []
    for batch in _progress(batches, desc, progress):
        batch = speed.prepare(batch, device)
        with speed.autocast(device):
            out: LossOutput = compute_loss(model, batch, weights)
        if speed.sync_every_step:
            out.total.item()
        total_loss += out.total
        pred_loss += out.terms["pred_incomplete"]
        preds.append(out.pred)
        labels.append(batch.labels.reshape(-1))
        if keep_features:
            feats.append({**out.view.utterance, "fusion": out.view.context})
    result = _epoch_result(total_loss, pred_loss, len(preds), preds, labels)
    if keep_features:
        result.features = {k: torch.cat([f[k] for f in feats]).float().cpu() for k in feats[0]}
    return result


def _epoch_result(total: Tensor, pred_loss: Tensor, n: int, preds: list[Tensor], labels: list[Tensor]) -> EpochResult:
    if n == 0:
        raise ValueError("no batches: the data split is empty")
    return EpochResult(loss=total.item() / n, pred_loss=pred_loss.item() / n,
                       preds=torch.cat(preds).float().cpu(), labels=torch.cat(labels).float().cpu())


def save_weights(model: torch.nn.Module, path: Path, *, prefix: str = "") -> None:
    """Saves the state dict as CPU tensors (keys prefixed, e.g. 'Model.' for MMSA's AMIO wrapper)."""
    write_atomically({prefix + k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def write_atomically(state: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it: an interrupted or failed write
    leaves the previous checkpoint whole."""
    try:
        with atomic_file(path, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as error:
        raise OSError(f"could not write the checkpoint {path} ({error}); the previous one, if any, is "
                      "unchanged") from error


class BestCheckpoint:
    """The best weights so far: written to ``path`` at each ``save``, and read back by ``load_into``.

    ``background=True`` (what ``fit`` does on CUDA, where an epoch is a few seconds and writing bert-base's 440 MB
    about one): ``save`` copies the weights into host memory (pinned, without waiting for the GPU) and a thread
    writes them while training goes on; ``load_into`` then takes them from memory, not from the file. A write
    error is raised by the next ``save``, ``wait`` or ``load_into``. The writer is not a daemon thread, so the
    file is finished even if the program is interrupted meanwhile.
    """

    def __init__(self, path: Path, *, prefix: str = "", background: bool = False,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.path, self.prefix, self.background = Path(path), prefix, background
        self.meta = meta  # given: the file carries the model config too (``checkpoint.package``)
        self.held: dict[str, Tensor] | None = None  # background: the weights last saved, unprefixed
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, model: torch.nn.Module) -> None:
        if not self.background:
            self._write_state({k: v.detach().cpu() for k, v in model.state_dict().items()})
            return
        self.wait()  # the buffers are free again
        state = model.state_dict()
        on_cuda = any(v.is_cuda for v in state.values())
        if self.held is None or self.held.keys() != state.keys():
            self.held = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=on_cuda) for k, v in state.items()}
        for key, value in state.items():
            self.held[key].copy_(value.detach(), non_blocking=True)
        copied = None
        if on_cuda:
            copied = torch.cuda.Event()
            copied.record()  # after the copies, before the next optimizer step on this stream
        self._writer = threading.Thread(target=self._write, args=(copied,), name="checkpoint-writer")
        self._writer.start()

    def _write(self, copied: torch.cuda.Event | None) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            self._write_state(self.held)
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error

    def _write_state(self, state: Mapping[str, Tensor]) -> None:
        prefixed = {self.prefix + k: v for k, v in state.items()}
        write_atomically(prefixed if self.meta is None else package(prefixed, **self.meta), self.path)

    def wait(self) -> None:
        """Returns once the last save is on disk; raises its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def load_into(self, model: torch.nn.Module) -> None:
        self.wait()
        if self.held is not None:
            model.load_state_dict(self.held)
            return
        state = state_dict_of(torch.load(self.path, map_location="cpu"), str(self.path))
        model.load_state_dict({k[len(self.prefix):]: v for k, v in state.items()})


@dataclass
class FitResult:
    best_epoch: int
    best_value: float
    epochs: int
    history: list[dict[str, dict[str, float]]]


def fit(model: DLFR, train_batches: Iterable[TwoViewBatch], valid_batches: Iterable[TwoViewBatch], *,
        optimizer: torch.optim.Optimizer, weights: LossWeights, metric_fn: MetricFn, key_metric: str = "Loss",
        minimize: bool = True, early_stop: int = 8, max_epochs: int | None = None, update_every: int = 1,
        save_path: Path, checkpoint_prefix: str = "", checkpoint_meta: Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu", progress: bool = True,
        logger: logging.Logger | None = None, speed: SpeedConfig | None = None,
        on_epoch_end: Callable[[int, dict[str, float], dict[str, float]], None] | None = None,
        last_partial_group: str = "step") -> FitResult:
    """Trains until ``key_metric`` on the validation set has not improved for ``early_stop`` epochs (or
    ``max_epochs``); the best weights are saved to ``save_path`` (``BestCheckpoint``: on CUDA by a thread while
    training goes on) and loaded back into ``model`` at the end (unless the last epoch was the best: ``model``
    holds them already). ``checkpoint_meta`` (``checkpoint.metadata``): the file carries the model config too, as
    ``checkpoint.package`` writes it. ``last_partial_group``: see ``train_one_epoch`` (checked before the first
    batch)."""
    if last_partial_group not in LAST_PARTIAL_GROUP:
        raise ValueError(f"last_partial_group='{last_partial_group}' is not one of {list(LAST_PARTIAL_GROUP)}")
    log = logger or logging.getLogger(__name__)
    speed = speed or SpeedConfig()
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=speed.precision == "fp16")
    best = BestCheckpoint(save_path, prefix=checkpoint_prefix, background=torch.device(device).type == "cuda",
                          meta=checkpoint_meta)
    best_value, best_epoch, epoch, history = math.inf if minimize else -math.inf, 0, 0, []
    while max_epochs is None or epoch < max_epochs:
        epoch += 1
        train = train_one_epoch(model, train_batches, optimizer, weights, update_every=update_every, device=device,
                                desc=f"epoch {epoch} train", progress=progress, speed=speed, scaler=scaler,
                                last_partial_group=last_partial_group)
        valid = evaluate(model, valid_batches, weights, device=device, desc=f"epoch {epoch} valid",
                         progress=progress, speed=speed)
        if not math.isfinite(train.loss):
            raise FloatingPointError(f"the training loss became {train.loss} in epoch {epoch}; check the input "
                                     "features for extreme values and lower the learning rates")
        train_metrics = {**metric_fn(train.preds, train.labels), "Loss": train.loss}
        valid_metrics = {**metric_fn(valid.preds, valid.labels), "Loss": valid.loss, "Loss(pred_m)": valid.pred_loss}
        history.append({"train": train_metrics, "valid": valid_metrics})
        if key_metric not in valid_metrics:
            raise KeyError(f"KeyEval='{key_metric}' is not a validation result; choose one of {sorted(valid_metrics)}")
        value = valid_metrics[key_metric]
        improved = value <= best_value - 1e-6 if minimize else value >= best_value + 1e-6
        if improved:
            best_value, best_epoch = value, epoch
            best.save(model)
        log.info(f"epoch {epoch} (best {best_epoch}) | train loss {train.loss:.4f} | valid loss {valid.loss:.4f} | "
                 f"valid {key_metric} {value:.4f}{' (best, saved)' if improved else ''}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, train_metrics, valid_metrics)
        if epoch - best_epoch >= early_stop:
            log.info(f"early stop: valid {key_metric} has not improved for {early_stop} epochs")
            break
    if best_epoch == 0:  # e.g. a NaN correlation of constant predictions every epoch, or max_epochs=0
        last = history[-1]["valid"][key_metric] if history else "no epoch run"
        raise ValueError(f"valid {key_metric} never improved on its start ({last} after {epoch} epochs), so no "
                         "weights were saved; choose another KeyEval (e.g. 'Loss') or more epochs")
    if best_epoch != epoch:
        best.load_into(model)
    best.wait()  # on disk before returning: MMSA's _run reads it next
    return FitResult(best_epoch=best_epoch, best_value=best_value, epochs=epoch, history=history)
