"""The audio/vision LSTMs on CUDA: packed cuDNN LSTM against a padded LSTM run eagerly or replayed as a CUDA graph.

    python benchmarks/bench_lstm.py [--batch 64] [--repeats 20]

cuDNN runs a recurrence one time step after another: for MOSI's 375 audio and 500 vision frames a forward and
backward pass launches a few kernels per step, thousands per training step, each a few microseconds of GPU work,
so the host's launch rate sets the pace. A unidirectional LSTM over right-padded sequences gives the packed
results at every valid step, and its final state is the output at step length-1; padded, the shapes are static,
so the forward and backward can be captured once as CUDA graphs (``torch.cuda.make_graphed_callables``) and
replayed with one launch each. This script times forward+backward of one LSTM per modality (mosi's widths, batch
64 = both views of 32, lengths uniform in [T/2, T], fp32) in the three ways and checks that outputs at valid steps,
final states and weight gradients agree with the packed run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MODALITIES = {"audio": (375, 5, 32), "vision": (500, 20, 64)}  # frames, features, hidden (mosi config)


class PaddedLSTM(nn.Module):
    """The LSTM's per-step outputs over padded input (one tensor out, as graph capture wants)."""

    def __init__(self, rnn: nn.LSTM) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


def measure(name: str, frames: int, features: int, hidden: int, b: int, repeats: int,
            device: torch.device) -> None:
    """Times and checks the three ways for one modality."""
    torch.manual_seed(0)
    rnn = nn.LSTM(features, hidden, batch_first=True).to(device)
    x = torch.randn(b, frames, features, device=device)
    lengths = torch.randint(frames // 2, frames + 1, (b,))
    lengths[0] = frames
    last = (lengths - 1).to(device)
    valid = (torch.arange(frames)[None] < lengths[:, None]).to(device)  # (b, t)
    rows = torch.arange(b, device=device)

    def packed() -> tuple[Tensor, Tensor]:
        out, (h_n, _) = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(out, batch_first=True, total_length=frames)[0], h_n[-1]

    def padded(module: nn.Module) -> tuple[Tensor, Tensor]:
        out = module(x)  # (b, t, e)
        return out, out[rows, last]  # every step, and each sequence's last valid one

    padded_module = PaddedLSTM(rnn)
    variants = {"packed, eager": packed, "padded, eager": lambda: padded(padded_module)}
    try:
        graphed = torch.cuda.make_graphed_callables(padded_module, (x,))
        variants["padded, CUDA graph"] = lambda: padded(graphed)
    except RuntimeError as error:
        print(f"{name}: CUDA graph capture failed: {error!r}")
    reference = None
    for variant, run in variants.items():
        def step() -> tuple[Tensor, Tensor, Tensor]:
            rnn.zero_grad(set_to_none=True)
            local, final = run()  # noqa: B023  (called within its iteration)
            ((local * valid[..., None]).sum() + final.sum()).backward()
            return local, final, torch.cat([p.grad.flatten() for p in rnn.parameters()])

        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        local, final, grads = step()
        agree = ""
        if reference is None:
            reference = (local, final, grads)
        else:
            r_local, r_final, r_grads = reference
            local_err = ((local - r_local)[valid].abs().max() / r_local[valid].abs().max()).item()
            final_err = ((final - r_final).abs().max() / r_final.abs().max()).item()
            grad_err = ((grads - r_grads).norm() / r_grads.norm()).item()
            agree = f" | vs packed: outputs {local_err:.1e}, final state {final_err:.1e}, gradients {grad_err:.1e}"
        print(f"{name:6s} T={frames} {variant:20s} forward+backward {1e3 * statistics.median(times):7.2f} ms"
              f"{agree}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device, b = torch.device("cuda"), args.batch
    for name, (frames, features, hidden) in MODALITIES.items():
        measure(name, frames, features, hidden, b, args.repeats, device)


if __name__ == "__main__":
    main()
