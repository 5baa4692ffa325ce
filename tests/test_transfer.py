"""Host-to-device copies without a host synchronisation (fast.transfer.to_device), checked without a GPU."""

from typing import ClassVar

import torch
from conftest import build_model

from mmsa_emt.fast.transfer import to_device


class Recorded(torch.Tensor):
    """A CPU tensor that records how it is pinned and moved, instead of needing a CUDA device."""

    calls: ClassVar[list] = []

    def pin_memory(self, *args, **kwargs):
        Recorded.calls.append("pin_memory")
        return self

    def to(self, *args, **kwargs):
        Recorded.calls.append(("to", str(args[0]), kwargs.get("non_blocking", False)))
        return self


def test_cpu_to_cuda_goes_through_pinned_memory_without_blocking():
    Recorded.calls = []
    lengths = torch.tensor([3, 1, 2]).as_subclass(Recorded)
    to_device(lengths, "cuda")
    assert Recorded.calls == ["pin_memory", ("to", "cuda", True)]


def test_other_moves_are_plain_and_keep_values():
    Recorded.calls = []
    lengths = torch.tensor([3, 1, 2]).as_subclass(Recorded)
    to_device(lengths, "cpu")
    assert Recorded.calls == [("to", "cpu", False)]  # nothing pinned for a CPU target
    moved = to_device(torch.tensor([[1, 2], [3, 4]]).t(), "cpu")
    assert torch.equal(moved, torch.tensor([[1, 3], [2, 4]]))


def test_model_hands_back_lengths_on_the_inputs_device(tiny_config):
    """encode() returns the lengths the masks are built from on the device of the sequences (no .to() later)."""
    from conftest import random_batch

    model = build_model(tiny_config).eval()
    batch = random_batch(3)
    with torch.no_grad():
        _, local, lengths = model.net.encode("audio", batch.audio, batch.audio_lengths)
    assert lengths.device == local.device
    assert torch.equal(lengths, batch.audio_lengths.clamp(min=1))


def test_lengths_are_copied_to_the_device_once_per_modality(tiny_config, monkeypatch):
    """encode() hands its device copy to the padded LSTM, which then copies nothing itself."""
    from conftest import random_batch

    import mmsa_emt.fast.encoders
    import mmsa_emt.fast.views

    copies = []
    monkeypatch.setattr(mmsa_emt.fast.views, "to_device",
                        lambda t, device: copies.append("model") or to_device(t, device))
    monkeypatch.setattr(mmsa_emt.fast.encoders, "to_device",
                        lambda t, device: copies.append("encoder") or to_device(t, device))
    model = build_model(tiny_config, packed_lstm=False).eval()
    batch = random_batch(3)
    with torch.no_grad():
        model.net.encode("audio", batch.audio, batch.audio_lengths)
    assert copies == ["model"]
