"""Numerical checks of the fast modes on a CUDA device (the test suite covers the CPU): same losses and gradients.

    python benchmarks/check_cuda.py [--device cuda]

On one mosi-shaped batch (32 samples, sequences cut to a quarter) with a bert-base-sized encoder (random weights),
dropout off and BatchNorm in training mode, each comparison runs the same weights both ways and prints the relative
difference of every loss term (largest) and of all gradients together (||g - g_ref|| / ||g_ref||, and the largest
per-tensor value):

* fast fp32 (fused attention kernels, both views in one pass, trimmed padding, padded LSTMs, BERT's layers with one
  query/key/value matmul) against baseline fp32 (explicit score matrices, two passes, full padding, packed LSTMs,
  transformers' BERT forward), TF32 off: the issue's bar is 1e-5;
* fast fp32 with BERT's layers through transformers (``encoder_fused_qkv: false``) against fast, the same bar;
* fast fp32 with the modalities joined along time (``stack_modalities: time``) against the per-modality loop;
* the same model on CUDA against the CPU (fp32);
* bf16 autocast against fp32 (expected near 1e-2: bf16 keeps 8 bits of mantissa), and bf16 run to run (the
  noise of the GPU's atomic additions).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_train import SHAPES, make_batches
from workspace import bert_base

from mmsa_emt import DLFR, EMTDLFRConfig, LossWeights, compute_loss
from mmsa_emt.dlfr import emt_dlfr
from mmsa_emt.fast import SpeedConfig, apply, speed_config


def run(model: DLFR, batch, device: str, speed: SpeedConfig) -> tuple[dict, dict]:
    """Losses and gradients of one batch, under the autocast ``train_one_epoch`` uses."""
    model.zero_grad(set_to_none=True)
    with speed.autocast(device):
        out = compute_loss(model, speed.prepare(batch, device), LossWeights())
    out.total.backward()
    terms = {k: v.detach().double().cpu() for k, v in out.terms.items()} | {"total": out.total.detach().double().cpu()}
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads


def build(encoder: str, device: str, state: dict | None = None, preset: str = "fast", **levers) -> DLFR:
    """The model made to compute per the preset with ``levers`` overriding it (the model's levers; fp32 here)."""
    config = EMTDLFRConfig(pretrained=encoder, audio_dim=5, vision_dim=20)  # dropout 0 by default
    torch.manual_seed(0)
    speed = speed_config(preset, stack_modalities=levers.pop("stack_modalities", None), **levers)
    model = apply(emt_dlfr(config), speed, device).to(device).train()
    model.net.text_encoder.eval()  # BERT's dropout off; the DLFR BatchNorm heads stay in training mode
    if state is not None:
        model.load_state_dict(state)
    return model


def compare(name: str, ref: tuple[dict, dict], new: tuple[dict, dict], bar: float | None) -> bool:
    (t_ref, g_ref), (t_new, g_new) = ref, new
    loss_rel = max(abs(t_new[k] - v).item() / max(abs(v).item(), 1.0) for k, v in t_ref.items())
    flat_ref = torch.cat([g.flatten() for g in g_ref.values()])
    flat_new = torch.cat([g_new[n].flatten() for n in g_ref])
    grad_rel = ((flat_new - flat_ref).norm() / flat_ref.norm()).item()
    worst, worst_name = max((((g_new[n] - g).norm() / g.norm().clamp_min(1e-30)).item(), n) for n, g in g_ref.items())
    verdict = "" if bar is None else ("  PASS" if max(loss_rel, grad_rel) <= bar else "  FAIL") + f" (bar {bar:g})"
    print(f"{name:42s} losses {loss_rel:.1e} | gradients {grad_rel:.1e}{verdict}; worst tensor {worst:.1e} "
          f"({worst_name})", flush=True)
    return g_ref.keys() == g_new.keys() and (bar is None or max(loss_rel, grad_rel) <= bar)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as folder:
        encoder = bert_base(Path(folder) / "bert-base")
        batch = make_batches(SHAPES["mosi"], 1, True, encoder)[0]
        fp32 = SpeedConfig(trim_padding=True)
        bf16 = SpeedConfig(trim_padding=True, precision="bf16")
        baseline = build(encoder, device, preset="faithful")
        state = {k: v.detach().clone() for k, v in baseline.state_dict().items()}
        ref = run(baseline, batch, device, SpeedConfig(trim_padding=False))
        fast = run(build(encoder, device, state), batch, device, fp32)
        ok = compare("fast fp32 vs baseline fp32", ref, fast, 1e-5)
        unfused = run(build(encoder, device, state, encoder_fused_qkv=False), batch, device, fp32)
        ok &= compare("BERT: fused q/k/v vs transformers' layers (fp32)", unfused, fast, 1e-5)
        stacked = run(build(encoder, device, state, stack_modalities="time"), batch, device, fp32)
        ok &= compare("modalities joined along time vs per-modality loop (fp32)", fast, stacked, 1e-5)
        cpu = run(build(encoder, "cpu", state), batch, "cpu", fp32)
        compare(f"{device} vs cpu (fp32)", cpu, fast, None)
        half = run(build(encoder, device, state), batch, device, bf16)
        compare("bf16 autocast vs fp32", fast, half, None)
        compare("bf16, run to run (the GPU's noise)", half,
                run(build(encoder, device, state), batch, device, bf16), None)
    print("all checks passed" if ok else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
