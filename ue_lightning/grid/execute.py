"""Where a grid's stages run: here, one after another or several at once (a process pool), or as SLURM jobs.

Locally a stage starts as soon as every stage whose files it reads (its ``needs``) is done, at most
``jobs`` at once: a victim of clean data trains while the noise of the next cell is still being made,
and each stage is started once, so no two processes ever make the same noise file. On SLURM each stage is one job submitted through
submitit, and a job waits for the jobs whose files it reads (``--dependency=afterok``);
a stage with several GPUs per node runs one task a GPU, and Lightning's DDP reads SLURM's
environment. Nothing here schedules anything itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

from ue_lightning.grid.spec import STAGE_KINDS, Stage, cli_args


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Progress:
    """What :func:`run_local` says about its stages: a grid's lines (the time, then start, done, FAILED, skip).

    ``ue pipeline`` says it in its own words (:class:`ue_lightning.pipeline.PipelineProgress`).
    """

    def note(self, text: str) -> None:
        _say(text)

    def start(self, stage: Stage) -> None:
        _say(f"start {stage.name}")

    def done(self, stage: Stage, minutes: float) -> None:
        _say(f"done  {stage.name} in {minutes:.1f} min")

    def failed(self, stage: Stage, error: BaseException) -> None:
        _say(f"FAILED {stage.name}: {type(error).__name__}: {error} (log: {log_file(stage)})")

    def skipped(self, stage: Stage) -> None:
        _say(f"skip  {stage.name}: an input failed")

    def stopped(self) -> None:
        _say("stopped: ending the running stages (their checkpoints are kept; run again to resume)")


def log_file(stage: Stage) -> Path:
    """Where a stage's output (its stdout and stderr) goes: ``<folder>/log.txt``."""
    return Path(stage.folder) / "log.txt"


class StageExited(RuntimeError):
    """A stage that called ``sys.exit`` (e.g. its command line refused a setting): a failure of that stage alone."""


def run_logged(stage: Stage) -> float:
    """Run a stage with its output in ``<folder>/log.txt``; return its minutes.

    A stage that exits (jsonargparse exits on a setting it refuses) raises :class:`StageExited`, so the runner
    goes on with the other stages; only the runner's own stop (``_exit_on_sigterm``) and Ctrl-C end the run.
    """
    from ue_lightning.grid.stages import output_to, run_stage

    start = time.time()
    with output_to(log_file(stage)):
        try:
            run_stage(stage)
        except BaseException as error:
            traceback.print_exc()
            if isinstance(error, SystemExit) and error.code != _SIGTERM_EXIT:
                raise StageExited(f"the stage exited with code {error.code} (a setting its command line refused: "
                                  "its log says which)") from None
            raise
    return (time.time() - start) / 60


_SIGTERM_EXIT = 128 + signal.SIGTERM


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # _SIGTERM_EXIT: the runner stops, not a failure of the stage


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # Lightning's handler calls it too: a fit ends at once


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _stop_workers(pool: ProcessPoolExecutor, grace: float) -> None:
    """End the pool's running stages: SIGTERM its workers (each ends its stage at once, through Lightning's
    exception handling; a fit's last checkpoint is kept for the rerun), let them exit, and SIGKILL any still
    alive after ``grace`` seconds, so no stage outlives the runner."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public list before Python 3.14
    for worker in workers:
        worker.terminate()
    pool.shutdown(wait=False, cancel_futures=True)  # idle workers exit
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()


def run_local(stages: list[Stage], jobs: int = 1, grace: float = 60.0, threads: int | None = None,
              progress: Progress | None = None) -> list[Stage]:
    """Run the stages not done yet, ``jobs`` at once; return the failed ones.

    A stage starts when all its inputs are done (score models, then generators, then victims where several
    are ready); a stage whose inputs failed is not run (and counts as failed). Stopped (SIGTERM, Ctrl-C), the
    runner stops its running stages too (``_stop_workers``, ``grace`` seconds) before it exits: a stage left
    running could write the same cell as the next runner.

    Args:
        stages: what to run (those done already are skipped).
        jobs: stages at once.
        grace: seconds a stopped stage has to end before it is killed.
        threads: torch threads of each stage, each then in a worker process even with one job (None: with
            one job, in this process; with several, cores // jobs threads each).
        progress: what is said when a stage starts, ends, fails (None: the grid's time-stamped lines).
    """
    if jobs < 1:
        raise ValueError(f"grid: --jobs must be at least 1, got {jobs}")
    progress = progress or Progress()
    order = {kind: i for i, kind in enumerate(STAGE_KINDS)}
    todo = sorted((s for s in stages if not s.done()), key=lambda s: order[s.kind])
    unfinished = {s.key for s in todo}
    failed: dict[str, Stage] = {}
    running: dict[Future, Stage] = {}

    def finish(stage: Stage, minutes: float | None, error: BaseException | None) -> None:
        unfinished.discard(stage.key)
        if error is None:
            progress.done(stage, minutes)
        else:  # one failed cell must not stop the others
            failed[stage.key] = stage
            progress.failed(stage, error)

    def next_ready() -> Stage | None:
        """The first stage whose inputs are all done, skipping (and failing) those whose inputs failed."""
        for stage in list(todo):
            if any(k in failed for k in stage.needs):
                todo.remove(stage)
                unfinished.discard(stage.key)
                failed[stage.key] = stage
                progress.skipped(stage)
            elif not any(k in unfinished for k in stage.needs):
                todo.remove(stage)
                return stage
        return None

    pool = None
    restore = None
    if jobs > 1 or threads is not None:
        threads = threads or max(1, cores() // jobs)
        pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                                   initargs=(threads,))
        progress.note(f"{jobs} processes at once, {threads} torch thread(s) each")
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the run, in this process too
        restore = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    stopped = True
    try:
        while todo or running:
            while len(running) < jobs and (stage := next_ready()) is not None:
                progress.start(stage)
                if pool is None:  # one at a time, in this process
                    try:
                        finish(stage, run_logged(stage), None)
                    except Exception as error:
                        finish(stage, None, error)
                else:
                    running[pool.submit(run_logged, stage)] = stage
            if not running:
                if todo:  # cannot happen for a grid's stages: their inputs are stages of the same grid
                    raise RuntimeError(f"grid: no stage can start: the inputs of the stages left form a cycle: "
                                       f"{sorted({k for s in todo for k in s.needs if k in unfinished})}")
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                try:
                    finish(stage, future.result(), None)
                except Exception as error:
                    finish(stage, None, error)
        stopped = False
    finally:
        if stopped:
            progress.stopped()
        if pool:
            if stopped:
                _stop_workers(pool, grace)
            else:
                pool.shutdown()
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    return list(failed.values())


def _ddp_args(resources: dict) -> list[str]:
    """Trainer settings for the job's GPUs: one DDP process a GPU, SLURM's tasks."""
    gpus, nodes = int(resources.get("gpus_per_node") or 0), int(resources.get("nodes") or 1)
    if not gpus:
        return []
    settings = {"trainer.accelerator": "gpu", "trainer.devices": gpus, "trainer.num_nodes": nodes}
    if gpus * nodes > 1:
        settings["trainer.strategy"] = "ddp"
    return cli_args(settings)


def slurm_resources(slurm: dict, kind: str) -> dict:
    """submitit parameters of a stage: the grid's ``slurm.all`` updated by ``slurm.<kind>``, one task a GPU."""
    unknown = set(slurm) - {"all", *STAGE_KINDS}
    if unknown:
        raise ValueError(f"grid: slurm: unknown keys {sorted(unknown)} (allowed: all, {', '.join(STAGE_KINDS)})")
    resources = {**(slurm.get("all") or {}), **(slurm.get(kind) or {})}
    if resources.get("gpus_per_node"):
        resources.setdefault("tasks_per_node", resources["gpus_per_node"])
    return resources


def submit_slurm(stages: list[Stage], slurm: dict, folder: Path) -> dict[str, str]:
    """Submit each stage not done yet as a SLURM job (submitit); return ``{stage key: job id}``."""
    try:
        import submitit
    except ImportError as error:
        raise ImportError("--executor slurm needs submitit: pip install 'ue-lightning[slurm]'") from error
    from ue_lightning.grid.slurm import StageJob

    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    jobs: dict[str, str] = {}
    for stage in stages:
        if stage.done():
            continue
        resources = slurm_resources(slurm, stage.kind)
        extra = dict(resources.pop("slurm_additional_parameters", None) or {})
        waits = [jobs[k] for k in stage.needs if k in jobs]
        if waits:
            extra["dependency"] = "afterok:" + ":".join(waits)
        executor.update_parameters(name=f"ue-{stage.kind}-{stage.key}", slurm_additional_parameters=extra,
                                   **resources)
        job = executor.submit(StageJob(), replace(stage, args=[*stage.args, *_ddp_args(resources)]))
        jobs[stage.key] = str(job.job_id)
        _say(f"submitted {stage.name}: job {job.job_id}" + (f" (after {', '.join(waits)})" if waits else ""))
    return jobs
