"""``mmsa_emt.atomic.atomic_file``: the one way the package writes over a file. A write that fails leaves the old
file whole and no temporary file; writers racing on one path leave one whole file; permissions are kept."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mmsa_emt.atomic
from mmsa_emt.atomic import atomic_file, write_text


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def race(write: Callable[[Any], None], values: list[Any], rounds: int = 5) -> list[BaseException]:
    """Runs ``write(value)`` for each value on its own thread, ``rounds`` times, each round started together;
    returns the errors raised."""
    barrier = threading.Barrier(len(values), timeout=30)
    errors: list[BaseException] = []

    def writer(value: Any) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()
                write(value)
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(value,)) for value in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_write_cut_midway_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    with pytest.raises(type(error)):
        with atomic_file(path) as handle:
            handle.write("new, half written")
            handle.flush()
            raise error
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path):
    """A process killed mid-write (no cleanup runs) leaves the old file as it was; only its hidden temporary file
    remains."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    script = ("import importlib.util, os, sys\n"  # the module alone: importing the package would load MMSA
              "spec = importlib.util.spec_from_file_location('atomic', sys.argv[2])\n"
              "atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)\n"
              "with atomic.atomic_file(sys.argv[1], 'wb') as f:\n"
              "    f.write(b'new' * 1000); f.flush(); os._exit(9)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), mmsa_emt.atomic.__file__])
    assert done.returncode == 9
    assert path.read_bytes() == b"old"
    assert all(p.name.startswith(".weights.bin.") for p in tmp_path.iterdir() if p != path)


def test_two_writers_leave_one_whole_file(tmp_path):
    path = tmp_path / "shared.pkl"
    contents = [bytes([i]) * (1 << 20) for i in (1, 2)]

    def write(data: bytes) -> None:
        with atomic_file(path, "wb") as handle:
            for start in range(0, len(data), 1 << 16):  # in pieces, so the two writes interleave
                handle.write(data[start:start + (1 << 16)])

    assert not race(write, contents)
    assert path.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["shared.pkl"]


def test_permissions_are_kept_and_a_new_file_is_readable(tmp_path):
    path = tmp_path / "kept.json"
    write_text(path, "{}\n")
    assert mode_of(path) == 0o644  # not mkstemp's 0600: others sharing the folder read it
    os.chmod(path, 0o640)
    write_text(path, "{\"a\": 1}\n")
    assert mode_of(path) == 0o640 and path.read_text() == "{\"a\": 1}\n"


def test_text_is_utf8_with_newlines_as_written(tmp_path):
    path = tmp_path / "t.csv"
    write_text(path, "é,x\r\ny\n")
    assert path.read_bytes() == "é,x\r\ny\n".encode()


def test_other_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        with atomic_file(tmp_path / "x", "a"):
            pass
    assert not list(tmp_path.iterdir())


def test_two_writers_of_one_checkpoint_leave_one_whole_file(tmp_path, monkeypatch):
    """The trainer's checkpoint writes go through ``atomic_file``: each writer has a temporary file of its own (a
    shared '<name>.partial' let one writer rename the other's file away, or into place half-written). torch.save
    is slowed here to write in pieces, so that the two writes overlap."""
    import mmsa_emt.trainer as trainer

    real_save = torch.save

    def save_in_pieces(state: dict, file: object) -> None:
        buffer = io.BytesIO()
        real_save(state, buffer)
        data = buffer.getvalue()
        handle = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
        for start in range(0, len(data), 1 << 14):
            handle.write(data[start:start + (1 << 14)])
            time.sleep(0.0005)
        if handle is not file:
            handle.close()

    monkeypatch.setattr(trainer.torch, "save", save_in_pieces)
    path = tmp_path / "best.pth"
    states = [{"w": torch.full((128, 128), float(i))} for i in (1, 2)]
    assert not race(lambda state: trainer.write_atomically(state, path), states)
    loaded = torch.load(path)["w"]
    assert loaded.unique().numel() == 1 and float(loaded[0, 0]) in (1.0, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]


def test_written_configs_and_feature_copies_are_readable_by_others(tmp_path, workspace):
    """Configs written for the repository and normalized feature copies get 0644 as any new file, not the
    temporary file's 0600."""
    from mmsa_emt.configs import write_configs
    from mmsa_emt.normalize import normalize_file

    written = write_configs(tmp_path / "config")
    assert {mode_of(path) for path in written} == {0o644}
    workspace("mosi", scale=0.03)
    source = tmp_path / "dataset" / "MOSI" / "Processed" / "unaligned_50.pkl"
    normalize_file(source, tmp_path / "normalized.pkl")
    assert mode_of(tmp_path / "normalized.pkl") == 0o644
