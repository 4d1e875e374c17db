"""The queue check_claims.py runs the scripts with (common/infra/jobs.py): at most ``at_once`` at a time, a job
marked ``alone`` with nothing beside it, prerequisites first, queue order otherwise, one log per job, and a failure
that stops the others and names the job."""
import json
import sys
import time

import pytest

from common.infra.jobs import Job, JobFailed, _next, run_jobs


def sleeper(tag, seconds, out, alone=False, after=(), code=0):
    """A job that records when it started and ended (in ``out``/<tag>.json), prints its tag and exits ``code``."""
    prog = (f"import json, sys, time; t0 = time.time(); print({tag!r}); time.sleep({seconds}); "
            f"open({str(out / (tag + '.json'))!r}, 'w').write(json.dumps([t0, time.time()])); sys.exit({code})")
    return Job(tag, [sys.executable, "-c", prog], alone, tuple(after))


def spans(out, tags):
    return {t: json.loads((out / f"{t}.json").read_text()) for t in tags}


def overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]


def test_at_most_at_once_run_an_alone_job_runs_by_itself_and_prerequisites_come_first(tmp_path):
    jobs = [sleeper("solo", 0.6, tmp_path, alone=True), sleeper("a", 1.5, tmp_path), sleeper("b", 0.3, tmp_path),
            sleeper("c", 0.3, tmp_path, after=("a",)), sleeper("d", 0.3, tmp_path)]
    done = run_jobs(jobs, 2, tmp_path / "logs", tmp_path, poll=0.05)
    assert set(done) == {"solo", "a", "b", "c", "d"} and all(r["returncode"] == 0 for r in done.values())
    s = spans(tmp_path, done)
    assert not any(overlap(s["solo"], s[t]) for t in "abcd")           # alone: nothing beside it
    assert overlap(s["a"], s["b"])                                      # two at a time
    assert s["c"][0] >= s["a"][1]                                       # after its prerequisite
    assert s["d"][0] < s["a"][1] <= s["c"][0]                           # d, ready, is not held back by c's wait
    for t in "abcd":                                                    # never three at once
        assert sum(u[0] <= s[t][0] < u[1] for u in s.values()) <= 2
        assert (tmp_path / "logs" / f"{t}.log").read_text().strip() == t
        assert done[t]["wall_time"] > 0.2


def test_the_choice_of_the_next_job():
    solo, a, b = Job("solo", [], alone=True), Job("a", []), Job("b", [], after=("a",))
    assert _next([solo, a], {}, {}) is solo
    assert _next([solo, a], {"p": a}, {}) is None           # an alone job waits for an empty machine, holding a back
    assert _next([a, b], {"p": solo}, {}) is None           # nothing beside an alone one
    assert _next([b, a], {}, {}) is a                       # b waits for a
    assert _next([b], {}, {"a": {}}) is b


def test_a_failing_job_stops_the_others_and_names_itself(tmp_path):
    jobs = [sleeper("long", 30, tmp_path), sleeper("bad", 0.2, tmp_path, code=3)]
    t0 = time.perf_counter()
    with pytest.raises(JobFailed, match=r"\(bad\) failed with exit code 3"):
        run_jobs(jobs, 2, tmp_path / "logs", tmp_path, poll=0.05)
    assert time.perf_counter() - t0 < 10                   # the long one was stopped, not waited for
    assert not (tmp_path / "long.json").exists()


def test_bad_queues_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown: \\['nowhere'\\]"):
        run_jobs([sleeper("a", 0, tmp_path, after=("nowhere",))], 2, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="unique"):
        run_jobs([sleeper("a", 0, tmp_path), sleeper("a", 0, tmp_path)], 2, tmp_path, tmp_path)
    with pytest.raises(ValueError, match="cannot finish"):
        run_jobs([sleeper("a", 0, tmp_path, after=("b",)), sleeper("b", 0, tmp_path, after=("a",))], 2, tmp_path,
                 tmp_path, poll=0.01)
    with pytest.raises(ValueError, match="at_once"):
        run_jobs([], 0, tmp_path, tmp_path)
    assert not list(tmp_path.glob("*.json"))
