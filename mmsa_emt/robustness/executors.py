"""Where the trials of a sweep run: ``local`` (one after another in this process, the default, no Ray needed) or
``ray`` (Ray tasks on this machine or a cluster, each with its own CPU and GPU share).

Either way a trial is a plain function of a picklable ``Job`` and the calling process (the driver) is the only
writer of the results: it gets each trial's outcome the moment the trial ends (``on_done``) and records a trial
that failed after its retries (``on_failed``), while the other trials go on.
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

EXECUTORS = ("local", "ray")
INSTALL_HINT = 'pip install -e ".[ray]"'


class RayMissingError(ImportError):
    """``executor='ray'`` was asked for but Ray is not installed."""


def require_ray() -> ModuleType:
    """The ``ray`` module, or an error saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise RayMissingError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT} "
                              f"(or pip install 'ray[tune]')") from error
    return ray


@dataclass(frozen=True)
class ExecutorSettings:
    """How trials are run. ``cpus_per_trial``: CPU cores each trial is given, and its torch/OpenMP/MKL thread
    count (Ray's default 1 for ``ray``; ``None`` leaves the local process's threads as they are).
    ``gpus_per_trial``: GPUs each Ray task reserves (a fraction shares one GPU between trials); 0 runs on the CPU.
    ``retries``: further attempts after a trial fails (an exception, or its Ray worker lost)."""

    kind: str = "local"
    address: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0
    retries: int = 1

    def check(self) -> ExecutorSettings:
        """Every option checked before anything is trained; errors name the option."""
        if self.kind not in EXECUTORS:
            raise ValueError(f"--executor/executor={self.kind!r} is not one of {', '.join(EXECUTORS)}")
        if self.kind == "local" and (self.address is not None or self.gpus_per_trial):
            used = "--address" if self.address is not None else "--gpus-per-trial"
            raise ValueError(f"{used} is a setting of --executor ray; the local executor uses --gpu-ids")
        if self.cpus_per_trial is not None and (isinstance(self.cpus_per_trial, bool)
                                                or not isinstance(self.cpus_per_trial, (int, float))
                                                or not math.isfinite(self.cpus_per_trial)
                                                or self.cpus_per_trial <= 0):
            raise ValueError(f"--cpus-per-trial/cpus_per_trial={self.cpus_per_trial!r} must be a number > 0")
        if isinstance(self.gpus_per_trial, bool) or not isinstance(self.gpus_per_trial, (int, float)) \
                or not math.isfinite(self.gpus_per_trial) or self.gpus_per_trial < 0:
            raise ValueError(f"--gpus-per-trial/gpus_per_trial={self.gpus_per_trial!r} must be a number >= 0")
        if self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer():
            raise ValueError(f"--gpus-per-trial/gpus_per_trial={self.gpus_per_trial}: a fraction shares one GPU; "
                             "above 1 give a whole number")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"--retries/retries={self.retries!r} must be a whole number >= 0")
        if self.kind == "ray":
            require_ray()
        return self

    @property
    def threads(self) -> int | None:
        """Threads per trial: its CPU share, rounded down, at least 1 (Ray's default share is 1 CPU)."""
        cpus = self.cpus_per_trial if self.cpus_per_trial is not None else (1 if self.kind == "ray" else None)
        return None if cpus is None else max(1, int(cpus))


@dataclass(frozen=True)
class Job:
    """One trial as it travels to a worker: ``fn(*args, **kwargs)``, with the process set up first (threads,
    and for Ray the device the trial sees)."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    """A trial that failed on every attempt."""

    job: Job
    error: str
    details: str
    attempts: int


def limit_threads(threads: int) -> None:
    """Sets torch's intra-op threads and the OpenMP/MKL variables to ``threads``: several trials on one machine
    at default thread counts oversubscribe the cores and wait on each other in OpenMP's spin loops."""
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


def run_job(job: Job, threads: int | None, device: str | None) -> Any:
    """Runs one job in this process. ``device`` (Ray tasks): 'cuda:0', the only GPU Ray left visible to this task
    through CUDA_VISIBLE_DEVICES, or 'cpu'; it is passed to the trial as ``device``."""
    if threads is not None:
        limit_threads(threads)
    kwargs = dict(job.kwargs)
    if device is not None:
        kwargs["device"] = device
    return job.fn(*job.args, **kwargs)


def _ray_task(job: Job, threads: int | None, gpus: float) -> Any:
    """The body of a Ray task: Ray has set CUDA_VISIBLE_DEVICES to the GPU(s) it reserved, so GPU 0 is this
    task's own; without a GPU share the trial runs on the CPU (Ray leaves the variable alone then)."""
    return run_job(job, threads, "cuda:0" if gpus > 0 else "cpu")


def run_local(jobs: Iterable[Job], settings: ExecutorSettings, on_done: Callable[[Job, Any], None],
              on_failed: Callable[[Failure], None]) -> None:
    """Runs ``jobs`` one after another in this process; a job raising an ``Exception`` is tried again up to
    ``settings.retries`` times, then reported to ``on_failed``. An interrupt (``KeyboardInterrupt``,
    ``SystemExit``) stops the sweep at once."""
    for job in jobs:
        for attempt in range(1, settings.retries + 2):
            try:
                result = run_job(job, settings.threads, None)
            except Exception as error:  # any trial error is recorded with its traceback, and the sweep goes on
                if attempt <= settings.retries:
                    continue
                on_failed(Failure(job, f"{type(error).__name__}: {error}", traceback.format_exc(), attempt))
            else:
                on_done(job, result)
            break


def run_ray(jobs: Iterable[Job], settings: ExecutorSettings, on_done: Callable[[Job, Any], None],
            on_failed: Callable[[Failure], None]) -> None:
    """Runs ``jobs`` as Ray tasks (``num_cpus``/``num_gpus`` from ``settings``); Ray retries a task whose worker
    died (``max_retries``) or which raised (``retry_exceptions``) up to ``settings.retries`` times. Results come
    back to this process as tasks end, in whatever order. Joins the cluster at ``settings.address`` or the one
    ``ray.init`` already made; else starts a local one, shut down at the end. Tasks still pending when this
    process is interrupted are cancelled."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=True)
        started = True
    cpus = settings.cpus_per_trial if settings.cpus_per_trial is not None else 1
    task = ray.remote(_ray_task).options(num_cpus=cpus, num_gpus=settings.gpus_per_trial,
                                         max_retries=settings.retries, retry_exceptions=True)
    pending = {task.remote(job, settings.threads, settings.gpus_per_trial): job for job in jobs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # the trial raised on every attempt
                    cause = error.cause if isinstance(error.cause, BaseException) else error
                    on_failed(Failure(job, f"{type(cause).__name__}: {cause}", str(error), settings.retries + 1))
                except ray.exceptions.RayError as error:  # its worker or node was lost on every attempt
                    on_failed(Failure(job, f"{type(error).__name__}: {str(error).splitlines()[0]}", str(error),
                                      settings.retries + 1))
                else:
                    on_done(job, result)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def run_jobs(jobs: Iterable[Job], settings: ExecutorSettings, on_done: Callable[[Job, Any], None],
             on_failed: Callable[[Failure], None]) -> None:
    """``run_local`` or ``run_ray``, as ``settings.kind`` says."""
    (run_ray if settings.kind == "ray" else run_local)(jobs, settings, on_done, on_failed)
