"""The offline demo at a smaller size, its encoder, and the README's commands."""

import hashlib
import json
import re

import pandas as pd
import pytest
from conftest import REPO

from mmsa_emt.cli import main
from mmsa_emt.demo import DemoSettings, minilm_path, run_demo

BERT_BASE_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


def test_minilm_ships_bert_base_uncased_vocabulary_and_a_384_wide_encoder():
    folder = minilm_path()
    vocab = (folder / "vocab.txt").read_bytes()
    assert hashlib.sha256(vocab).hexdigest() == BERT_BASE_UNCASED_VOCAB_SHA256
    tokens = vocab.decode("utf-8").splitlines()
    assert len(tokens) == 30522
    anchors = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "the": 1996, "good": 2204,
               "bad": 2919, "movie": 3185}
    assert {t: tokens.index(t) for t in anchors} == anchors
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 384


def test_demo_runs_end_to_end_at_a_smaller_size(tmp_path):
    lines = []
    table = run_demo(DemoSettings(out=tmp_path / "demo", scale=0.03, text_len=24, frames=16, seeds=(1,),
                                  rates=(0.0, 1.0), sweep_seeds=(1,), max_epochs=1, early_stop=1),
                     echo=lines.append)
    assert list(table["missing rate"]) == [0.0, 1.0]
    assert table["MAE"].notna().all() and (table["MAE / constant"] > 0).all()
    out = tmp_path / "demo"
    frame = pd.read_csv(out / "results" / "normal" / "mosi.csv")
    assert list(frame["Model"]) == ["emt-dlfr"]
    assert (out / "robustness" / "robustness_mosi_train-once@0.5.png").stat().st_size > 20_000
    assert (out / "robustness" / "auilc_mosi_train-once@0.5.md").is_file()
    assert (out / "models" / "emt-dlfr-mosi-seed1.pth").is_file()
    text = "\n".join(lines)
    assert "[4/4] summary" in text and "constant mean-label predictor" in text


def test_readme_commands_are_the_ones_that_run():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert blocks[0] == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m mmsa_emt demo'
    assert blocks[1] == "python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pip install --quiet torch==2.13.0" in ci and ci.rstrip().endswith(blocks[1])
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (REPO / image).is_file(), image
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0
