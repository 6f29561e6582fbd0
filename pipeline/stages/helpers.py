"""More training processes on this machine (``run.jobs``): the train stage starts ``jobs - 1``
helper processes that train units beside it and stop after the train stage.

Why processes and not threads: on a small CPU a second process trains more images per second
than a second thread (EfficientNet-Lite0, 64 px, batch 64, on a 2-core machine: 2 threads are
1.27x one thread; 2 one-thread processes 1.6x). Helpers claim units with the same lock files as
jobs started by hand (``pipeline.stages.jobs``) and visit the entries in another order (the
first helper from the last entry back), so the processes meet in the middle and the longest
units (a joint entry, a pool chain) start early. ``run.threads`` is split among the processes.
"""
from __future__ import annotations

import multiprocessing
import traceback
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import TaskfoldError


class HelperError(TaskfoldError, RuntimeError):
    """A helper process failed; the message carries its last log lines and names its log."""


def entry_order(n_entries: int, job: int, jobs: int) -> list[int]:
    """The order in which job ``job`` of ``jobs`` visits the entries: job 0 (the main process)
    forward, job 1 backward, the others forward from evenly spaced starts."""
    order = list(range(n_entries))
    if job == 1:
        return order[::-1]
    start = (job * n_entries) // jobs if job else 0
    return order[start:] + order[:start]


def threads_per_job(threads: int, jobs: int) -> int:
    return max(1, threads // jobs)


@dataclass
class Helper:
    job: int
    process: multiprocessing.Process
    log: Path
    ready: object  # an Event: set when the helper has imported torch and read the prepared data

    def failure(self) -> str | None:
        """None if it exited cleanly, else its exit code and the end of its log."""
        if self.process.exitcode == 0:
            return None
        try:
            tail = self.log.read_text().strip().splitlines()[-6:]
        except OSError:
            tail = []
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with {code}"
        return f"training helper {self.job} {how}; the end of its log {self.log}:\n  " + "\n  ".join(tail)


def start(cfg, root: Path, selection, jobs: int, logs: Path) -> list[Helper]:
    """Start helpers 1 .. jobs-1 (spawned: a forked torch with threads running is not safe)."""
    mp = multiprocessing.get_context("spawn")
    logs.mkdir(parents=True, exist_ok=True)
    helpers = []
    for job in range(1, jobs):
        log = logs / f"job{job}.log"
        log.write_text("")
        ready = mp.Event()
        p = mp.Process(target=_helper_main, args=(cfg, str(root), selection, job, jobs, str(log), ready),
                       name=f"taskfold-train-{job}", daemon=False)
        p.start()
        helpers.append(Helper(job, p, log, ready))
    for h in helpers:  # start together, so each process begins at its own end of the entries
        while not h.ready.wait(0.5) and h.process.is_alive():
            pass
    if dead := [h for h in helpers if not h.ready.is_set()]:  # failed before training anything
        stop(helpers)
        raise HelperError("\n".join(h.failure() or f"training helper {h.job} did not start" for h in dead))
    return helpers


def finish(helpers: list[Helper]) -> None:
    """Wait for every helper; raise naming the first that failed."""
    for h in helpers:
        h.process.join()
    failures = [f for h in helpers if (f := h.failure())]
    if failures:
        raise HelperError("\n".join(failures))


def stop(helpers: list[Helper]) -> None:
    """End helpers early (the main process failed). SIGTERM ends a helper's unit cleanly (its
    lock released, its last epoch checkpoint kept for a resume); one that does not end in 30 s
    is killed, and its lock, now stale, is taken over by the next run."""
    for h in helpers:
        if h.process.is_alive():
            h.process.terminate()
    for h in helpers:
        h.process.join(timeout=30)
        if h.process.is_alive():
            h.process.kill()
            h.process.join()


def train_in_processes(stage, ctx, jobs: int) -> dict:
    """The train stage in this process and ``jobs - 1`` helpers; then one more pass here trains
    what waited for a unit another process held (a joint base, a pool chain's head)."""
    import torch

    threads = torch.get_num_threads()
    each = threads_per_job(ctx.cfg.run.threads, jobs)
    logs = ctx.run.root / "train" / "jobs"
    started = start(ctx.cfg, ctx.run.root, ctx.selection, jobs, logs)
    ctx.log(f"train: {jobs} processes (run.jobs), {each} thread(s) each; the helpers' logs are in "
            f"{ctx.run.rel(logs)}/")
    torch.set_num_threads(each)
    try:
        stage.train_units(ctx)
        finish(started)
    except BaseException:
        stop(started)
        raise
    finally:
        torch.set_num_threads(threads)
    log = ctx.log
    ctx.log = lambda line: None if line.endswith("up to date, skipped") else log(line)
    try:
        return stage.train_units(ctx)
    finally:
        ctx.log = log


def _helper_main(cfg, root: str, selection, job: int, jobs: int, log_file: str, ready) -> None:
    import signal
    import sys

    import torch

    from pipeline.stages.base import run_stage
    from pipeline.stages.context import StageContext
    from pipeline.stages.prepare import PrepareStage
    from pipeline.stages.rundir import RunDir
    from pipeline.stages.train import TrainStage

    with open(log_file, "a", buffering=1) as f:
        def log(line: str) -> None:
            print(line, file=f)

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the unit's lock is released
        try:
            torch.set_num_threads(threads_per_job(cfg.run.threads, jobs))
            ctx = StageContext(cfg, RunDir(Path(root)), progress=False, log=log)
            ctx.selection = selection
            ctx.job = (job, jobs)
            run_stage(PrepareStage(), ctx)  # the main process prepared: this reads its record
            ready.set()
            TrainStage().train_units(ctx)
        except BaseException as err:  # noqa: BLE001 - the parent reads the log and names it
            log(traceback.format_exc())
            log(f"error: {err}")
            raise SystemExit(1) from None
