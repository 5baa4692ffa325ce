"""Writes tests/data/legacy_checkpoint.pt: a tiny EMT-DLFR checkpoint in the state-dict layout of commit aab9ff3
(the network held the DLFR heads: keys 'Model.text_encoder...', 'Model.restoration...'), with its eval-mode
prediction and loss on ``random_batch(3)``. Run from a checkout of that commit:

    git worktree add /tmp/old aab9ff3 && cp tests/data/make_legacy_checkpoint.py /tmp/old/tests/data/
    cd /tmp/old && python tests/data/make_legacy_checkpoint.py tests/data/legacy_checkpoint.pt

tests/test_checkpoint_layout.py loads it into the current layout.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's random_batch

from conftest import random_batch

from mmsa_emt import EMTDLFR, EMTDLFRConfig, LossWeights, compute_loss
from mmsa_emt.synthetic import write_tiny_bert

TINY = dict(audio_dim=5, vision_dim=7, audio_hidden=8, vision_hidden=8, audio_out=4, vision_out=6, d_model=16,
            fusion_layers=2, heads=2, post_fusion_dim=8, predictor_dims={"context": 8, "text": 8, "audio": 2,
                                                                         "vision": 3})


def main(out: str) -> None:
    torch.manual_seed(7)
    with tempfile.TemporaryDirectory() as folder:
        model = EMTDLFR(EMTDLFRConfig(pretrained=str(write_tiny_bert(folder)), **TINY))
    batch = random_batch(3)
    with torch.no_grad():  # a few running-statistic updates, so the BatchNorm buffers are not their defaults
        model.train()
        compute_loss(model, random_batch(4, seed=1), LossWeights())
        model.eval()
        pred = model(batch.text, batch.audio, batch.vision, batch.audio_lengths, batch.vision_lengths)["M"]
        loss = compute_loss(model, batch, LossWeights()).total
    state = {"Model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "pred": pred, "loss": loss, "config": TINY}, out)


if __name__ == "__main__":
    main(sys.argv[1])
