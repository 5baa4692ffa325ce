"""Robustness sweeps never give a silently wrong table: settings are checked before training, configurations are
never averaged together, a rewritten feature file is noticed, and a results file cut mid-write is repaired."""

import os
import pickle
import threading
import time
import warnings
from pathlib import Path

import matplotlib.figure
import pandas as pd
import pytest

from mmsa_emt import robustness
from mmsa_emt.cli import main
from mmsa_emt.missing import incomplete_view_file
from mmsa_emt.robustness import (
    KEY_COLUMNS,
    DamagedResultsWarning,
    ReplacedResultsWarning,
    TrialSpec,
    append_rows,
    auilc_table,
    config_hash,
    read_results,
    results_path,
    summarize,
    sweep,
)


def fake_trial(calls: list[TrialSpec]):
    """A trial function that trains nothing: MAE = 1 + test rate + seed / 100, keyed as run_trial keys rows."""

    def trial(spec: TrialSpec, config_file, *, out_dir, overrides=None, **_):
        calls.append(spec)
        digest = config_hash(spec.model, spec.dataset, config_file, overrides,
                             digest_cache=Path(out_dir) / robustness.DIGEST_CACHE)
        return [{**dict(zip(KEY_COLUMNS, [spec.model, spec.dataset, spec.protocol, *spec.train_rates, *rates,
                                          spec.seed, digest])),
                 "MAE": 1.0 + rates[0] + spec.seed / 100, "Corr": 0.5, "checkpoint": f"{spec.tag}.pth",
                 "seconds": 1.5, "finished_at": "2026-01-01T00:00:00+00:00"} for rates in spec.test_rates]

    return trial


def run(config: Path, out: Path, calls: list, **kwargs) -> robustness.SweepResult:
    settings = {"rates": [0.0, 0.5, 1.0], "seeds": [1, 2], "protocol": "train-once", "train_rate": 0.5, **kwargs}
    return sweep("EMT-DLFR", "mosi", config, out_dir=out, progress=False, echo=lambda _: None,
                 trial_fn=fake_trial(calls), **settings)


# --- settings are checked before anything is trained -------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train_rate": 1.5}, r"--train-rate/train_rate=1.5 must lie in \[0, 1\]"),
    ({"train_rate": "abc"}, r"--train-rate/train_rate=abc is not a number"),
    ({"rates": [0.0, -0.1]}, r"--rates/rates=-0.1 must lie in \[0, 1\]"),
    ({"rates": [0.0, float("nan")]}, r"--rates/rates=nan must lie in \[0, 1\]"),
    ({"rates": None, "modality_rates": [(0.0, 0.2, 1.2)]}, r"--modality-rates/modality_rates=1.2 must lie"),
    ({"rates": None, "modality_rates": [(0.0, 0.2)]}, r"--modality-rates/modality_rates: each setting needs three"),
    ({"seeds": [1, "abc"]}, r"--seeds/seeds=abc is not a number"),
    ({"seeds": [1, 2.5]}, r"--seeds/seeds=2.5 must be a whole number"),
    ({"seeds": [1, 1]}, r"--seeds/seeds=\[1, 1\] lists a seed more than once"),
    ({"rates": [0.5, 0.5]}, r"--rates/rates lists 0.5 more than once"),
    ({"protocol": "leave-one-out"}, r"--protocol/protocol='leave-one-out' is not one of per-rate, train-once"),
])
def test_bad_settings_fail_before_any_training(workspace, tmp_path, kwargs, message):
    config, calls = workspace("mosi", scale=0.03), []
    with pytest.raises(ValueError, match=message):
        run(config, tmp_path / "out", calls, **kwargs)
    assert calls == [] and not results_path(tmp_path / "out", "mosi").exists()


def test_numeric_strings_are_converted(workspace, tmp_path):
    config, calls = workspace("mosi", scale=0.03), []
    result = run(config, tmp_path / "out", calls, rates=["0", "0.5"], seeds=["3"], train_rate="0.5")
    assert [(c.seed, c.train_rates, c.test_rates) for c in calls] == [(3, (0.5,) * 3, ((0.0,) * 3, (0.5,) * 3))]
    assert list(result.results.protocol) == ["train-once@0.5"] * 2


def test_cli_names_the_option_of_a_bad_training_rate(workspace, tmp_path, capsys, monkeypatch):
    config = workspace("mosi", scale=0.03)
    monkeypatch.setattr(robustness.trial, "run_trial", lambda *a, **k: pytest.fail("a trial ran"))
    with pytest.raises(SystemExit) as exit_info:
        main(["robustness", "--model", "TFN", "--dataset", "mosi", "--config", str(config), "--protocol",
              "train-once", "--train-rate", "1.5", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--train-rate/train_rate=1.5 must lie in [0, 1]" in capsys.readouterr().err


# --- configurations are never mixed ------------------------------------------------------------------------------

def rewrite_labels(feature_file: Path) -> None:
    """Rewrites a feature file with the same shapes and size but other labels (as a label correction would)."""
    with open(feature_file, "rb") as f:
        data = pickle.load(f)
    for split in data.values():
        split["regression_labels"] = -split["regression_labels"]
    size, stamp = feature_file.stat().st_size, feature_file.stat().st_mtime_ns
    with open(feature_file, "wb") as f:
        pickle.dump(data, f, protocol=4)
    os.utime(feature_file, ns=(stamp + 10**9, stamp + 10**9))
    assert feature_file.stat().st_size == size


def test_a_rewritten_feature_file_is_a_new_configuration(workspace, tmp_path):
    config, calls = workspace("mosi", scale=0.03), []
    feature = tmp_path / "dataset" / "MOSI" / "Processed" / "unaligned_50.pkl"
    before = config_hash("EMT-DLFR", "mosi", config)
    run(config, tmp_path / "out", calls, seeds=[1])
    rewrite_labels(feature)
    assert config_hash("EMT-DLFR", "mosi", config) != before
    result = run(config, tmp_path / "out", calls, seeds=[1])
    assert result.trained == 1  # not the old results
    assert result.results.config_hash.nunique() == 2 and len(result.summary) == 6  # 3 rates x 2 configurations

    stamp = feature.stat().st_mtime_ns  # the same content touched: the same configuration, nothing reruns
    os.utime(feature, ns=(stamp + 10**9, stamp + 10**9))
    assert run(config, tmp_path / "out", calls, seeds=[1]).trained == 0


def test_feature_digest_is_cached_by_path_size_and_mtime(workspace, tmp_path, monkeypatch):
    config = workspace("mosi", scale=0.03)
    feature = tmp_path / "dataset" / "MOSI" / "Processed" / "unaligned_50.pkl"
    cache = tmp_path / "out" / robustness.DIGEST_CACHE
    opened: list[Path] = []

    def counting_open(file, *args, **kwargs):
        opened.append(Path(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(robustness.digests, "open", counting_open, raising=False)
    monkeypatch.setattr(robustness.digests, "_DIGESTS", {})
    first = config_hash("EMT-DLFR", "mosi", config, digest_cache=cache)
    assert config_hash("TFN", "mosi", config, digest_cache=cache)  # another model, the same file: in memory
    monkeypatch.setattr(robustness.digests, "_DIGESTS", {})  # a new process: read from the cache file
    assert config_hash("EMT-DLFR", "mosi", config, digest_cache=cache) == first
    assert [p for p in opened if p.name == feature.name] == [feature.resolve()]
    assert str(feature.resolve()) in cache.read_text()


def test_derived_incomplete_view_follows_a_rewritten_feature_file(workspace, tmp_path):
    workspace("mosi", scale=0.03)
    feature = tmp_path / "dataset" / "MOSI" / "Processed" / "unaligned_50.pkl"
    first = incomplete_view_file(feature, [0.5] * 3, [1, 2, 3], tmp_path / "cache")
    rewrite_labels(feature)
    second = incomplete_view_file(feature, [0.5] * 3, [1, 2, 3], tmp_path / "cache")
    with open(second, "rb") as f, open(feature, "rb") as g:
        assert (pickle.load(f)["test"]["regression_labels"] == pickle.load(g)["test"]["regression_labels"]).all()
    assert first != second


def test_two_configurations_get_two_rows_and_two_legend_entries(workspace, tmp_path, monkeypatch):
    config, calls, out = workspace("mosi", scale=0.03), [], tmp_path / "out"
    run(config, out, calls, overrides={"max_epochs": 2})
    legends: list[list[str]] = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: legends.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    result = run(config, out, calls, overrides={"max_epochs": 3})
    assert result.trained == 2
    hashes = sorted(result.results.config_hash.unique())
    labels = [f"EMT-DLFR [{h[:7]}]" for h in hashes]
    summary = result.summary
    assert len(summary) == 6 and summary.seeds.eq(2).all()  # never one row of "4 seeds"
    assert sorted(summary.model.unique()) == labels and list(summary.columns)[-1] == "config_hash"
    assert sorted(result.auilc.model) == labels and sorted(result.auilc.config_hash) == hashes
    assert sorted(legends[-1]) == labels
    table = pd.read_csv(out / "auilc_mosi_train-once@0.5.csv", dtype={"config_hash": str})
    assert sorted(table.model) == labels and len(table) == 2

    one = summarize(result.results[result.results.config_hash == hashes[0]], "mosi")
    assert set(one.model) == {"EMT-DLFR"} and set(auilc_table(one, "mosi").model) == {"EMT-DLFR"}


# --- a torn results file is repaired, not trusted ----------------------------------------------------------------

def cut(path: Path, keep_bytes: int) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    return data


def test_row_cut_mid_number_runs_its_trial_again(workspace, tmp_path):
    config, calls, out = workspace("mosi", scale=0.03), [], tmp_path / "out"
    run(config, out, calls)
    csv_path = results_path(out, "mosi")
    data = csv_path.read_bytes()
    last = data.splitlines(keepends=True)[-1].decode()
    digest = last.split(",")[10]
    torn = last[:last.index(digest) + len(digest) + len(",2.0")]  # seed 2 at rate 1: MAE 2.02 cut mid-number
    csv_path.write_bytes(data[:len(data) - len(last)] + torn.encode())
    with pytest.warns(DamagedResultsWarning, match="1 damaged line .*left out"):
        assert len(read_results(csv_path)) == 5  # the reader says what it leaves out

    calls.clear()
    tag = "EMT-DLFR-mosi-train-once@0.5-r0.5-0.5-0.5-seed2"
    with pytest.warns(DamagedResultsWarning, match=f"line 7: trial {tag}") as w, \
            pytest.warns(ReplacedResultsWarning, match="2 earlier rows"):
        result = run(config, out, calls)
    assert "run again" in str(w[0].message)
    assert [c.seed for c in calls] == [2] and result.trained == 1
    frame = read_results(csv_path)
    assert len(frame) == 6 and not frame.duplicated(KEY_COLUMNS).any() and frame.seconds.eq(1.5).all()
    assert frame.MAE.notna().all() and result.summary.seeds.eq(2).all()
    side = csv_path.with_name(csv_path.name + ".damaged").read_text()
    assert side.startswith("# ") and side.splitlines()[1] == torn  # kept as it was, with a newline added
    assert len(csv_path.with_name(csv_path.name + ".replaced").read_text().splitlines()) == 3  # comment + 2 rows


def test_trial_cut_between_its_rows_is_not_done(workspace, tmp_path):
    config, calls, out = workspace("mosi", scale=0.03), [], tmp_path / "out"
    run(config, out, calls)
    csv_path = results_path(out, "mosi")
    lines = csv_path.read_bytes().splitlines(keepends=True)
    cut(csv_path, sum(map(len, lines[:-1])))  # the last trial's write stopped after two of its three rows
    calls.clear()
    with pytest.warns(ReplacedResultsWarning):
        result = run(config, out, calls)
    assert [c.seed for c in calls] == [2]
    assert len(result.results) == 6 and not result.results.duplicated(KEY_COLUMNS).any()


def test_row_appended_onto_a_cut_row_is_not_lost(workspace, tmp_path):
    """The file an unguarded appender leaves: a cut row with the next trial's row glued to it."""
    config, calls, out = workspace("mosi", scale=0.03), [], tmp_path / "out"
    run(config, out, calls, protocol="per-rate", rates=[0.0, 1.0], seeds=[1])
    csv_path = results_path(out, "mosi")
    header, first, second = csv_path.read_bytes().splitlines(keepends=True)
    glued = first[:first.index(b",1.01,") + 4] + second  # the first row cut in its MAE, the second one glued on
    csv_path.write_bytes(header + glued)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedResultsWarning)
        assert read_results(csv_path).empty  # neither row is read as a result
    calls.clear()
    with pytest.warns(DamagedResultsWarning, match=r"EMT-DLFR-mosi-per-rate-r0-0-0-seed1"):
        result = run(config, out, calls, protocol="per-rate", rates=[0.0, 1.0], seeds=[1])
    assert result.trained == 2 and len(result.results) == 2
    assert glued in csv_path.with_name(csv_path.name + ".damaged").read_bytes()


def test_cut_header_is_set_aside(workspace, tmp_path):
    config, calls, out = workspace("mosi", scale=0.03), [], tmp_path / "out"
    csv_path = results_path(out, "mosi")
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("model,dataset,proto")
    with pytest.warns(DamagedResultsWarning):
        result = run(config, out, calls, seeds=[1])
    assert result.trained == 1 and len(read_results(csv_path)) == 3
    assert "\nmodel,dataset,proto\n" in csv_path.with_name(csv_path.name + ".damaged").read_text()


def test_append_after_a_cut_line_starts_on_its_own_line(tmp_path):
    rows = [{**dict(zip(KEY_COLUMNS, ["TFN", "mosi", "per-rate", 0.0, 0.0, 0.0, r, r, r, 1, "abc123abc123"])),
             "MAE": 1.0, "checkpoint": "x.pth", "seconds": 1.0, "finished_at": "t"} for r in (0.0, 0.5)]
    path = tmp_path / "results_mosi.csv"
    append_rows(path, rows[:1])
    with open(path, "a") as f:
        f.write("TFN,mosi,per-rate,0.0,0.0,0.0,0.5,0.5,0.5,1,abc123abc123,0.7")  # a writer killed mid-row
    with pytest.warns(DamagedResultsWarning, match="1 damaged line"):
        append_rows(path, rows[1:])
    frame = read_results(path)
    assert frame.rate_t.tolist() == [0.0, 0.5] and frame.MAE.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="could not be read back"):
        append_rows(path, [{**rows[0], "checkpoint": "a\nb"}])
    with pytest.raises(ValueError, match="could not be read back"):
        append_rows(path, [{**rows[0], "MAE": None}])


def test_append_waits_for_the_lock(tmp_path):
    path = tmp_path / "results_mosi.csv"
    row = {**dict(zip(KEY_COLUMNS, ["TFN", "mosi", "per-rate", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1, "abc123abc123"])),
           "MAE": 1.0, "checkpoint": "x.pth", "seconds": 1.0, "finished_at": "t"}
    with robustness.results._locked(path, exclusive=True):
        writer = threading.Thread(target=append_rows, args=(path, [row]))
        writer.start()
        time.sleep(0.3)
        assert not path.exists()  # another writer holds the file
    writer.join(5)
    assert len(read_results(path)) == 1


def test_a_trial_returning_other_keys_is_refused(workspace, tmp_path):
    config = workspace("mosi", scale=0.03)

    def stale(spec, config_file, **kwargs):
        return [{**row, "config_hash": "0123456789ab"} for row in fake_trial([])(spec, config_file, **kwargs)]

    with pytest.raises(ValueError, match="returned rows for other keys"):
        sweep("EMT-DLFR", "mosi", config, rates=[0.0], seeds=[1], out_dir=tmp_path / "out", progress=False,
              echo=lambda _: None, trial_fn=stale)
    assert not results_path(tmp_path / "out", "mosi").exists()


def test_every_model_of_a_sweep_drops_the_same_steps(workspace, tmp_path):
    """MMSA's entries carry missing_seed [1111, 1111, 1111], EMT-DLFR's the authors' [111, 1111, 11111]: a sweep
    gives every model one draw (EMT-DLFR's, or the sweep's own) so their incomplete views are the same."""
    from mmsa_emt.mmsa.config import trial_args

    config, seen = workspace("mosi", scale=0.03), {}

    def trial(spec, config_file, *, out_dir, overrides=None, **kwargs):
        seen[spec.model] = trial_args(spec.model, spec.dataset, config_file, overrides=overrides)["missing_seed"]
        return fake_trial([])(spec, config_file, out_dir=out_dir, overrides=overrides, **kwargs)

    models = ["EMT-DLFR", "TFN", "TFR_Net"]
    sweep(models, "mosi", config, rates=[0.5], seeds=[1], out_dir=tmp_path / "a", trial_fn=trial,
          progress=False, echo=lambda _: None)
    assert seen == {m: [111, 1111, 11111] for m in models}
    sweep(models, "mosi", config, rates=[0.5], seeds=[1], out_dir=tmp_path / "b", trial_fn=trial,
          overrides={"missing_seed": [5, 6, 7]}, progress=False, echo=lambda _: None)
    assert seen == {m: [5, 6, 7] for m in models}
    with pytest.raises(ValueError, match="missing_seed"):
        robustness.sweep_missing_seeds("mosi", config, {"missing_seed": [1, 2]})
