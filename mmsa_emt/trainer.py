"""Training loop for EMT-DLFR: optimizer groups, one epoch, evaluation, early stopping with best-weight saving.

Framework-free: batches arrive as ``TwoViewBatch`` and metrics through a callable, so MMSA's trainer interface
(``mmsa_compat.EMTDLFRTrainer``) and plain scripts both sit on top of it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .model import EMTDLFR
from .nn.weight_casts import ReusedCasts, gathered_slots, joined_slots, low_precision_slots
from .objective import LossOutput, LossWeights, TwoViewBatch, compute_loss

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


def build_optimizer(model: EMTDLFR, config: OptimConfig, *, fused: bool | None = None) -> torch.optim.Adam:
    """Adam with five groups: BERT with decay, BERT bias/LayerNorm without, audio LSTM, vision LSTM, the rest.

    Asserts that every trainable parameter is in exactly one group. ``fused`` (default: when every parameter is
    on the CPU or CUDA) updates all parameters in a few fused kernels instead of several per tensor: same update
    rule (on 2 CPU cores a bert-base-sized step takes 0.11 s instead of 0.63 s).
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


def auto_precision(device: torch.device | str) -> str:
    """``precision: auto``: 'bf16' where the hardware multiplies bf16 matrices natively, else 'fp32'.

    CUDA: bf16 from Ampere on (``torch.cuda.is_bf16_supported`` without emulation; older cards would emulate it).
    CPU: x86 with AMX-BF16 (Sapphire Rapids and later Xeons); there, at the full MOSI shape, a training step ran
    1.40x faster and peaked 1.2 GiB lower than in fp32 (benchmarks/results/cpu-2026-11-28). Other CPUs have no bf16
    matrix units and convert in software (not measured here, where the CPU has AMX). Test metrics in bf16 and fp32
    agree within seed noise (benchmarks/metrics_report.py).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 cannot leave emulation out: NVIDIA's bf16 units came with Ampere (sm_80)
            native = torch.cuda.get_device_capability(device)[0] >= 8
        return "bf16" if native else "fp32"
    if device.type == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: fp32 there
        return "bf16" if capabilities is not None and capabilities().get("amx_bf16", False) else "fp32"
    return "fp32"


@dataclass
class SpeedConfig:
    """How the work is done, not what is computed (see benchmarks/bench_train.py for what each lever pays)."""

    trim_padding: bool = True  # cut each batch to its longest sequences before the encoders
    trim_multiple: int | None = None  # trimmed lengths rounded up to a multiple of it; None: 8 on CUDA, else 1
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass (fp16 with loss scaling)
    sync_every_step: bool = False  # read the loss back to the host each step, as the authors' loop does
    compile: bool = False  # torch.compile the text encoder and the fusion (compile_model)
    reuse_weight_casts: bool = True  # under autocast, Linear weights cast once per optimizer step (same numbers)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision='{self.precision}' is not one of {sorted(PRECISIONS)}")
        if self.trim_multiple is not None and self.trim_multiple < 1:
            raise ValueError(f"trim_multiple={self.trim_multiple}: trimmed lengths need a multiple >= 1")

    def autocast(self, device: torch.device | str) -> torch.autocast:
        kind = torch.device(device).type
        return torch.autocast(kind, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32")

    @contextmanager
    def float32_matmuls(self, device: torch.device | str) -> Iterator[None]:
        """With bf16/fp16 asked for on CUDA, float32 matmuls left outside autocast (BERT with
        ``encoder_autocast: false``) run on TF32 tensor cores, forward and backward; the flag is restored after."""
        if torch.device(device).type != "cuda" or self.precision == "fp32":
            yield
            return
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before

    def prepare(self, batch: TwoViewBatch, device: torch.device | str) -> TwoViewBatch:
        """The batch trimmed and on ``device``. On CUDA the trimmed lengths are multiples of 8: then the key masks
        over text and frames are aligned as the memory-efficient attention kernel needs them, where an unaligned
        one is copied into a padded buffer on every call (PyTorch's ``preprocess_mask``), and fewer shapes come
        round (kernel plans, compilation)."""
        if not self.trim_padding:
            return batch.to(device)
        multiple = self.trim_multiple or (8 if torch.device(device).type == "cuda" else 1)
        return batch.trimmed(multiple).to(device)

    def prepare_model(self, model: EMTDLFR) -> EMTDLFR:
        return compile_model(model) if self.compile else model

    def weight_casts(self, model: torch.nn.Module) -> ReusedCasts:
        """The low-precision weight copies one epoch or evaluation reuses (``nn.weight_casts``), with the norms'
        float32 parameters gathered for their gradients; without slots, which change nothing, when not asked for or
        compiled (Inductor fuses the casts into the graph)."""
        if not self.reuse_weight_casts or self.compile:
            return ReusedCasts([])
        return ReusedCasts(low_precision_slots(model), gathered=gathered_slots(model), joined=joined_slots(model))


def compile_model(model: EMTDLFR, *, backend: str | Callable = "inductor") -> EMTDLFR:
    """Compiles, in place, the parts made of many small kernels: the text encoder and the EMT fusion.

    Shapes are marked dynamic (trimmed batches vary in length), the LSTMs stay eager (one cuDNN/oneDNN call), the
    state dict keeps its keys. Compilation happens on the first batches, so the first steps are slow. Python
    floats (LayerNorm's eps) are traced as constants: traced as inputs, the fusion's shared layers recomputed by
    ``checkpoint_fusion`` at several call sites crash TorchDynamo (pytorch/pytorch#193194). A part whose compiler
    backend fails runs eagerly from then on, with a warning (``_compiled_or_eager``).
    """
    net = getattr(model, "net", model)  # the network inside its DLFR wrapper
    for part in ("text_encoder", "emt"):
        module = getattr(net, part, None)
        if module is not None:
            module.forward = _compiled_or_eager(module.forward, part, backend)
    return model


def _compiled_or_eager(forward: Callable, part: str, backend: str | Callable) -> Callable:
    """``forward`` through ``torch.compile``, traced with TorchDynamo's ``specialize_float`` on, only for itself.

    If the compiler backend fails (Inductor on an H200 with PyTorch 2.11 stopped in its partitioner on the shipped
    CUDA config: benchmarks/results/h200-2026-11-28), the part runs eagerly from then on and a warning names it and
    the error: the same numbers without the speed-up, not a run lost minutes in. Only that exception is caught;
    errors of the model itself propagate as they would eagerly."""
    compiled = torch.compile(forward, dynamic=True, backend=backend)
    eager = False

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal eager
        if not eager:
            try:
                with torch._dynamo.config.patch(specialize_float=True):
                    return compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as error:
                eager = True
                inner = error.inner_exception
                _log.warning("compile: torch.compile's backend %r failed on %s (%s: %s); %s runs eagerly from now "
                             "on (compile: false skips compiling)", error.backend_name, part,
                             type(inner).__name__, inner, part)
        return forward(*args, **kwargs)

    return call


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EpochResult:
    loss: float
    pred_loss: float  # L1 of the incomplete-view prediction alone
    preds: Tensor  # (n,) CPU
    labels: Tensor  # (n,) CPU
    metrics: dict[str, float] = field(default_factory=dict)
    features: dict[str, Tensor] | None = None  # h_l, h_a, h_v, flatten(G) of the incomplete view, if kept


def flush_denormals() -> bool:
    """Flushes subnormal floats to zero for this process, unless MMSA_EMT_FLUSH_DENORMAL=0.

    Heavily zeroed inputs (high missing rates) make subnormal values in training; on the CPU they slowed a
    training run by 4x here (40 s -> 10 s for one trial at rate 1.0). Values below ~1e-38 become 0, nothing else
    changes. It must be set before PyTorch starts its CPU worker threads, hence at ``import mmsa_emt``.
    """
    if os.environ.get("MMSA_EMT_FLUSH_DENORMAL", "1") == "0":
        return False
    return torch.set_flush_denormal(True)


def _progress(batches: Iterable, desc: str, show: bool) -> tqdm:
    total = len(batches) if isinstance(batches, Sized) else None
    hidden = {} if show else {"disable": True}  # shown: tqdm's own rules (TQDM_DISABLE, no bar off a terminal)
    return tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True, **hidden)


def train_one_epoch(model: EMTDLFR, batches: Iterable[TwoViewBatch], optimizer: torch.optim.Optimizer,
                    weights: LossWeights, *, update_every: int = 1, device: torch.device | str = "cpu",
                    desc: str = "train", progress: bool = True, speed: SpeedConfig | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> EpochResult:
    """One pass; gradients accumulate over ``update_every`` mini-batches (summed, as the authors) and the epoch's
    last partial group is stepped too. ``scaler`` scales the loss for fp16."""
    speed = speed or SpeedConfig()
    scaler = scaler or torch.amp.GradScaler(torch.device(device).type, enabled=speed.precision == "fp16")
    model.train()
    total_loss = torch.zeros((), device=device)
    pred_loss = torch.zeros((), device=device)
    preds, labels = [], []
    bar = _progress(batches, desc, progress)
    n_batches = len(bar) if bar.total is not None else None
    optimizer.zero_grad(set_to_none=True)
    casts = speed.weight_casts(model)
    i = -1
    with speed.float32_matmuls(device):
        for i, batch in enumerate(bar):
            batch = speed.prepare(batch, device)
            with speed.autocast(device), casts.applied(device):
                out = compute_loss(model, batch, weights)
            scaler.scale(out.total).backward()
            if (i + 1) % update_every == 0 or (n_batches is not None and i + 1 == n_batches):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                casts.refresh()  # the weights changed
            if speed.sync_every_step:
                out.total.item()
            total_loss += out.total.detach()
            pred_loss += out.terms["pred_incomplete"].detach()
            preds.append(out.pred.detach())
            labels.append(batch.labels.reshape(-1))
            if progress and i % 10 == 0:
                bar.set_postfix(loss=f"{out.total.item():.4f}")
        if n_batches is None and (i + 1) % update_every:
            scaler.step(optimizer)  # unsized iterable: flush the last partial group
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return _epoch_result(total_loss, pred_loss, i + 1, preds, labels)


@torch.no_grad()
def evaluate(model: EMTDLFR, batches: Iterable[TwoViewBatch], weights: LossWeights, *,
             device: torch.device | str = "cpu", desc: str = "eval", progress: bool = True,
             keep_features: bool = False, speed: SpeedConfig | None = None) -> EpochResult:
    """Same loss as training, in eval mode; predictions are the incomplete view's."""
    speed = speed or SpeedConfig()
    model.eval()
    total_loss = torch.zeros((), device=device)
    pred_loss = torch.zeros((), device=device)
    preds, labels, feats = [], [], []
    casts = speed.weight_casts(model)  # cast once for the whole evaluation
    with speed.float32_matmuls(device):
        for batch in _progress(batches, desc, progress):
            batch = speed.prepare(batch, device)
            with speed.autocast(device), casts.applied(device):
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


def write_atomically(state: dict[str, Tensor], path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it: an interrupted or failed write
    leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        partial.unlink(missing_ok=True)
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

    def __init__(self, path: Path, *, prefix: str = "", background: bool = False) -> None:
        self.path, self.prefix, self.background = Path(path), prefix, background
        self.held: dict[str, Tensor] | None = None  # background: the weights last saved, unprefixed
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, model: torch.nn.Module) -> None:
        if not self.background:
            save_weights(model, self.path, prefix=self.prefix)
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
            write_atomically({self.prefix + k: v for k, v in self.held.items()}, self.path)
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error

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
        state = torch.load(self.path, map_location="cpu")
        model.load_state_dict({k[len(self.prefix):]: v for k, v in state.items()})


@dataclass
class FitResult:
    best_epoch: int
    best_value: float
    epochs: int
    history: list[dict[str, dict[str, float]]]


def fit(model: EMTDLFR, train_batches: Iterable[TwoViewBatch], valid_batches: Iterable[TwoViewBatch], *,
        optimizer: torch.optim.Optimizer, weights: LossWeights, metric_fn: MetricFn, key_metric: str = "Loss",
        minimize: bool = True, early_stop: int = 8, max_epochs: int | None = None, update_every: int = 1,
        save_path: Path, checkpoint_prefix: str = "", device: torch.device | str = "cpu", progress: bool = True,
        logger: logging.Logger | None = None, speed: SpeedConfig | None = None,
        on_epoch_end: Callable[[int, dict[str, float], dict[str, float]], None] | None = None) -> FitResult:
    """Trains until ``key_metric`` on the validation set has not improved for ``early_stop`` epochs (or
    ``max_epochs``); the best weights are saved to ``save_path`` (``BestCheckpoint``: on CUDA by a thread while
    training goes on) and loaded back into ``model`` at the end (unless the last epoch was the best: ``model``
    holds them already)."""
    log = logger or logging.getLogger(__name__)
    speed = speed or SpeedConfig()
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=speed.precision == "fp16")
    best = BestCheckpoint(save_path, prefix=checkpoint_prefix, background=torch.device(device).type == "cuda")
    best_value, best_epoch, epoch, history = math.inf if minimize else -math.inf, 0, 0, []
    while max_epochs is None or epoch < max_epochs:
        epoch += 1
        train = train_one_epoch(model, train_batches, optimizer, weights, update_every=update_every, device=device,
                                desc=f"epoch {epoch} train", progress=progress, speed=speed, scaler=scaler)
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
