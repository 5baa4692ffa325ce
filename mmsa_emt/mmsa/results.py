"""MMSA_run's results CSV (``<res_save_dir>/normal/<dataset>.csv``) shared by every model: rows added under a lock,
columns the union of all rows', the file replaced atomically (``append_results``), and the stand-ins through which
MMSA_run's own CSV code reaches it (see ``patches.PATCHES``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import MMSA.run as mmsa_run
import pandas as pd
from easydict import EasyDict
from filelock import FileLock

from ..atomic import atomic_file

_ORIGINAL_RUN = mmsa_run._run
_noted = threading.local()  # the result names of the last MMSA _run in this thread


def _run_noting_result_keys(args: EasyDict, num_workers: int = 4, is_tune: bool = False,
                            from_sena: bool = False) -> Any:
    """MMSA's ``_run``; notes the names of the results it returns (MMSA_run's CSV columns, see ``_mmsa_read_csv``)."""
    result = _ORIGINAL_RUN(args, num_workers, is_tune, from_sena)
    if not from_sena:
        _noted.result_keys = list(result)
    return result


def append_results(csv_file: str | os.PathLike, rows: pd.DataFrame) -> None:
    """Adds ``rows`` to the results CSV ``csv_file``, under the lock file ``<csv_file>.lock`` (runs finishing at
    the same time take turns): the rows already there are kept as written, the columns are the union of both (the
    file's first, then new ones; a row lacking a column gets an empty cell), and the file is replaced atomically.
    MMSA itself appends with the columns of the file's first writer and fails on a row with others (EMT-DLFR's
    'Loss(pred_m)')."""
    csv_file = Path(csv_file)
    new = rows.astype(object)
    with FileLock(f"{csv_file}.lock"):
        if csv_file.is_file():
            try:
                old = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
                raise ValueError(f"cannot add results to {csv_file}, which is not a readable CSV ({error}); it was "
                                 f"left unchanged. The new results:\n{new.to_string(index=False)}") from error
            new = pd.concat([old.astype(object), new], ignore_index=True, sort=False)
        with atomic_file(csv_file) as handle:
            new.to_csv(handle, index=False)


class _ResultsRows:
    """Stands in for the DataFrame ``MMSA_run`` fills for its results CSV, ``<res_save_dir>/normal/<dataset>.csv``:
    it takes this run's row (``df.loc[len(df)] = row``) and ``to_csv`` adds it to the file with ``append_results``
    instead of MMSA's unlocked read-modify-write with the file's first columns."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns, self.rows = list(columns), []
        self.loc = self

    def __len__(self) -> int:
        return len(self.rows)

    def __setitem__(self, index: int, row: Sequence[Any]) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"a results row of {len(row)} values for the columns {self.columns}")
        self.rows.append(list(row))

    def to_csv(self, path: str | os.PathLike, index: Any = None) -> None:
        append_results(path, pd.DataFrame(self.rows, columns=self.columns, dtype=object))


def _mmsa_read_csv(path: Any, *args: Any, **kwargs: Any) -> Any:
    """``pd.read_csv`` for MMSA.run; MMSA_run's read of its results CSV (``.../normal/<dataset>.csv``, after its
    runs) gets a ``_ResultsRows`` with this run's columns instead, the file being read later, under the lock."""
    keys = getattr(_noted, "result_keys", None)
    if args or kwargs or keys is None or Path(path).parent.name != "normal":
        return pd.read_csv(path, *args, **kwargs)
    del _noted.result_keys
    return _ResultsRows(["Model", *keys])


def _mmsa_data_frame(*args: Any, **kwargs: Any) -> Any:
    """``pd.DataFrame`` for MMSA.run; MMSA_run's new results table (columns 'Model', metrics...) is a
    ``_ResultsRows``."""
    columns = kwargs.get("columns")
    if not args and list(kwargs) == ["columns"] and columns and columns[0] == "Model":
        return _ResultsRows(columns)
    return pd.DataFrame(*args, **kwargs)
