"""A queue of commands run a few at a time (``check_claims.py`` runs the project's scripts with it).

Each job is a command with a tag; ``alone`` runs it with nothing beside it (its timings are judged), ``after``
names the tags that must have finished first. Jobs start in queue order: the first whose prerequisites have
finished, while fewer than ``at_once`` run; a job to run alone waits for an empty machine and holds back the
ones after it. Each job's output goes to ``<logs>/<tag>.log``. A failing job stops the others and raises,
naming the command and its log.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Job:
    """A command to run: recorded under ``tag``; ``alone``: with no other job running; ``after``: tags that must
    have finished first."""

    tag: str
    cmd: list
    alone: bool = False
    after: tuple = ()


class JobFailed(RuntimeError):
    """A job exited with a non-zero code (the message names it, its log and the log's tail)."""


def _next(pending: list[Job], running: dict, done: dict) -> Job | None:
    """The job to start now, or None: the first in order whose prerequisites have finished (an ``alone`` one only
    on an empty machine, and none after it while it waits), none while an ``alone`` one runs."""
    if any(j.alone for j in running.values()):
        return None
    for job in pending:
        if job.alone:
            return job if not running and all(t in done for t in job.after) else None
        if all(t in done for t in job.after):
            return job
    return None


def run_jobs(jobs: list[Job], at_once: int, logs: Path, cwd: Path, describe=str, poll: float = 0.5) -> dict:
    """Run ``jobs`` (see the module's docstring); return {tag: {"command", "wall_time", "returncode", "log"}} in
    the order they finished. ``describe(path)``: how a log's path is printed and recorded."""
    if at_once < 1:
        raise ValueError(f"at_once must be >= 1, got {at_once!r}")
    tags = [j.tag for j in jobs]
    unknown = sorted({t for j in jobs for t in j.after} - set(tags))
    if len(set(tags)) != len(tags) or unknown:
        raise ValueError(f"job tags must be unique and every prerequisite a queued tag (unknown: {unknown})")
    logs = Path(logs)
    pending, running, done, where = list(jobs), {}, {}, {}  # running: {process: job}; where: {process: (log, start)}
    try:
        while pending or running:
            while len(running) < at_once and (job := _next(pending, running, done)) is not None:
                pending.remove(job)
                log = logs / f"{job.tag.replace('/', '_')}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                print(f"$ {' '.join(map(str, job.cmd[1:]))}   (output: {describe(log)})", flush=True)
                with open(log, "w") as f:
                    proc = subprocess.Popen(job.cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
                running[proc], where[proc] = job, (log, time.perf_counter())
            if not running:  # nothing can start: a prerequisite never finishes
                raise ValueError(f"jobs {[j.tag for j in pending]} wait for prerequisites that cannot finish")
            time.sleep(poll)
            for proc, job in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[proc]
                log, started = where.pop(proc)
                wall = time.perf_counter() - started
                done[job.tag] = {"command": " ".join(["python"] + list(map(str, job.cmd[1:]))), "wall_time": wall,
                                 "returncode": proc.returncode, "log": describe(log)}
                if proc.returncode != 0:
                    print(f"  FAILED: {job.tag}", flush=True)
                    raise JobFailed(f"{job.cmd[1]} ({job.tag}) failed with exit code {proc.returncode}; its output: "
                                    f"{log}\n{log.read_text()[-3000:]}")
                print(f"  done in {wall:.0f} s: {job.tag}", flush=True)
    finally:
        for proc in running:  # a failure or an interrupt: stop the others
            proc.terminate()
        for proc in running:
            proc.wait()
    return done
