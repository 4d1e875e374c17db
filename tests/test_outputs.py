"""The output folder: nothing written before the settings are checked, one writer at a time, another
configuration refused unless --OVERWRITE=True (which removes its files), the same one resumed, and a
manifest of every file written with its sha256."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.experiments.config import at_least, configure, one_of, text
from common.infra.outputs import ConfigError, lock_output, write_text

ROOT = Path(__file__).resolve().parent.parent
E1 = ROOT / "exp_e1_between_kmeans_and_pca_k_1.py"
E2 = ROOT / "exp_e2_MNIST_SGD_PAM_ablations.py"
E3 = ROOT / "exp_e3_LLM_SGD_PAM_ablations.py"
FIG6 = ROOT / "fig_6_voronoi_to_power.py"
E3_QUICK = ["--quick", "--ONLY=base,k", "--METHODS=pam,sgd", "--WORKERS=1"]   # ~10 s on synthetic activations
HIDDEN = {".lock", ".written", "manifest.json"}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (the lock file aside)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def script(path, *args, timeout=120):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def started(tmp_path, files: dict, *args):
    """(run, out): a run configured into ``tmp_path / "out"`` (``args``: more command-line flags) that has
    written ``files`` ({path under out: text})."""
    out = tmp_path / "out"
    run = configure(namespace(), ["--out", str(out), *args])
    for name, content in files.items():
        write_text(out / name, content)
    return run, out


def namespace(**changes):
    ns = {"__file__": "/x/demo_script.py", "EPOCHS": 50, "ACTIVATION": "topk", "WORKERS": 2, "SEED": 0}
    ns["ACCEPT"] = {"EPOCHS": at_least(1), "ACTIVATION": one_of("topk", "relu"), "WORKERS": at_least(1),
                    "SEED": at_least(0)}
    ns.update(changes)
    return ns


# --- bad values: exit 2, one line naming the flag, nothing written ----------------------------------------
BAD = [(E2, ["--EPOCHS=0"], "--EPOCHS"), (E2, ["--N_TRAIN=-5", "--N_TEST=-9995"], "--N_TRAIN"),
       (E2, ["--N_TEST=-9995"], "--N_TEST"), (E2, ["--ACTIVATIONS="], "--ACTIVATIONS"),
       (E2, ["--UPDATES="], "--UPDATES"), (E2, ["--METHODS="], "--METHODS"), (E2, ["--ONLY="], "--ONLY"),
       (E1, ["--TEMPERATURE=0"], "--TEMPERATURE"), (E3, ["--TEST_FRACTION=1.5"], "--TEST_FRACTION"),
       (E3, ["--WORKERS=-1"], "--WORKERS"), (E3, ["--WORKERS=two"], "--WORKERS"),
       (E3, ["--MODEL=gemma-3-270M"], "--MODEL"), (E3, ["--K=0"], "--K"), (E3, ["--quick", "--KS=3,99"], "--KS")]


@pytest.mark.parametrize("path,args,flag", BAD, ids=[f"{p.stem[:6]}{' '.join(a)}" for p, a, _ in BAD])
def test_bad_value_exits_2_with_one_line_and_writes_nothing(tmp_path, path, args, flag):
    """Into a finished run's folder: its config.json is not overwritten, nothing is added; (two cases) into a
    new folder: it is never created."""
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.json").write_text('{"a finished run": true}\n')
    outs = [finished] + ([tmp_path / "fresh"] if flag in ("--EPOCHS", "--MODEL") else [])
    for out in outs:
        res = script(path, *args, "--out", out)
        assert res.returncode == 2, res.stderr[-2000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{flag}=" in lines[0] and "expected" in lines[0], res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "fresh").exists()
    assert snapshot(finished) == {"config.json": b'{"a finished run": true}\n'}


def test_range_errors_name_the_flag_not_an_internal_field(tmp_path):
    res = script(E3, "--TEST_FRACTION=1.5", "--out", tmp_path / "o")
    assert "--TEST_FRACTION=1.5: expected a number in (0, 1)" in res.stderr and "test_fraction" not in res.stderr


# --- the lock -----------------------------------------------------------------------------------------------
def test_second_writer_is_refused_at_once(tmp_path):
    out = tmp_path / "busy"
    with lock_output(out):
        res = script(FIG6, "--quick", "--out", out)
    assert res.returncode == 2
    assert f"--out {out}: the folder is in use by another run (process {os.getpid()}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == [".lock"]       # nothing written
    run = configure(namespace(), ["--out", str(out)])          # released: the folder can be used again
    run.finish()


# --- record, manifest, another configuration, resume (in-process, fast) ----------------------------------------
def test_manifest_lists_the_files_written_with_their_hashes(tmp_path):
    run, out = started(tmp_path, {"table.csv": "a,b\n", "topk/summary.md": "# s\n"})
    write_text(tmp_path / "elsewhere.txt", "not this run's")
    manifest = json.loads(run.finish(data={"fingerprint": "abc"}).read_text())
    assert set(manifest["files"]) == {"config.json", "table.csv", "topk/summary.md"}
    assert all(manifest["files"][f] == sha256(out / f) for f in manifest["files"])
    assert manifest["settings"]["constants"]["EPOCHS"] == 50 and manifest["data"] == {"fingerprint": "abc"}
    assert len(manifest["code"]["sha256"]) == 64 and "common/experiments/config.py" in manifest["code"]["files"]


def test_another_configuration_is_refused_then_replaced_with_overwrite(tmp_path):
    run, out = started(tmp_path, {"ablation_k.png": "stale figure", "runs/k3.json": "{}", "table.csv": "old\n"})
    run.finish()
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"another configuration \(--EPOCHS 50 there, 3 here\).*--OVERWRITE=True"):
        configure(namespace(), ["--EPOCHS=3", "--out", str(out)])
    assert snapshot(out) == before
    run = configure(namespace(), ["--EPOCHS=3", "--out", str(out), "--OVERWRITE=True"])
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".written", "config.json", "notes.txt"]
    write_text(out / "table.csv", "new\n")
    manifest = json.loads(run.finish().read_text())
    assert set(manifest["files"]) == {"config.json", "table.csv"}
    assert json.loads((out / "config.json").read_text())["constants"]["EPOCHS"] == 3


def test_the_same_configuration_resumes(tmp_path):
    run, out = started(tmp_path, {"runs/a.json": "{}"})
    run.release()                                       # interrupted: no manifest
    run, _ = started(tmp_path, {"runs/b.json": "{}"}, "--WORKERS=1")   # WORKERS changes no result: same configuration
    manifest = json.loads(run.finish().read_text())
    assert set(manifest["files"]) == {"config.json", "runs/a.json", "runs/b.json"}   # the reused run is listed


def test_a_folder_of_an_older_version_is_not_overwritten_blindly(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"script": "demo_script", "seed": 0, "constants": {"EPOCHS": 7}}))
    with pytest.raises(ConfigError, match="older version that kept no list of its files"):
        configure(namespace(), ["--out", str(out), "--OVERWRITE=True"])


# --- a real protocol (E3 on synthetic activations) ------------------------------------------------------------
@pytest.fixture(scope="module")
def e3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e3") / "run"
    res = script(E3, *E3_QUICK, "--out", out, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_e3_manifest_matches_the_folder(e3_run):
    manifest = json.loads((e3_run / "manifest.json").read_text())
    on_disk = {p.relative_to(e3_run).as_posix() for p in e3_run.rglob("*") if p.is_file() and p.name not in HIDDEN}
    assert set(manifest["files"]) == on_disk and "ablation_k.png" in on_disk and "models/pam_rep0.pt" in on_disk
    assert all(manifest["files"][f] == sha256(e3_run / f) for f in on_disk)
    assert len(manifest["data"]["fingerprint"]) == 64 and manifest["settings"]["constants"]["ONLY"] == ["base", "k"]
    assert not [p for p in e3_run.rglob("*") if ".tmp" in p.name]     # every temporary file was renamed


def test_e3_same_configuration_resumes(e3_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(e3_run, out)
    res = script(E3, *E3_QUICK, "--out", out, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming: 4 runs finished earlier" in res.stderr + res.stdout and "; 0 to train" in res.stderr + res.stdout


def test_e3_other_configuration_refused_then_overwritten_without_stale_files(e3_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(e3_run, out)
    before = snapshot(out)
    res = script(E3, *E3_QUICK[:-3], "--ONLY=base", "--METHODS=pam,sgd", "--WORKERS=1", "--out", out)
    assert res.returncode == 2 and "--ONLY base,k there, base here" in res.stderr and "--OVERWRITE=True" in res.stderr
    assert snapshot(out) == before
    res = script(E3, *E3_QUICK[:-3], "--ONLY=base", "--METHODS=pam,sgd", "--WORKERS=1", "--out", out,
                 "--OVERWRITE=True", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name not in HIDDEN}
    assert not [f for f in files if "ablation_k" in f or "_k_" in f], files     # the earlier k ablation is gone
    assert set(json.loads((out / "manifest.json").read_text())["files"]) == files


# --- the folder is owned: files the project did not write, nesting, a lost record, reused tuning ------------------
def test_a_folder_of_the_users_own_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "summary.md").write_text("# my notes")
    before = snapshot(out)
    with pytest.raises(ConfigError, match="holds files this project did not write \\(config.json, summary.md\\)"):
        configure(namespace(), ["--out", str(out)])
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_a_file_dropped_into_a_run_folder_is_never_replaced(tmp_path):
    from common.infra.outputs import OutputError
    run, out = started(tmp_path, {"table.csv": "a\n"})
    run.finish()
    (out / "summary.md").write_text("the user's own notes")
    run = configure(namespace(), ["--out", str(out)])          # the same configuration resumes
    with pytest.raises(OutputError, match="refusing to replace .*summary.md"):
        write_text(out / "summary.md", "# summary")
    write_text(out / "table.csv", "b\n")                        # its own files are replaced
    run.release()
    assert (out / "summary.md").read_text() == "the user's own notes"


def test_a_run_inside_or_above_another_runs_folder_is_refused(tmp_path):
    run, x = started(tmp_path, {"topk/table.csv": "a\n", "topk/summary.md": "# s\n"})
    run.finish()
    before = snapshot(x)
    for inner in (x / "topk", x / "new"):
        with pytest.raises(ConfigError, match=f"inside the output folder of another run \\({x}\\)"):
            configure(namespace(EPOCHS=3), ["--out", str(inner)])
    with pytest.raises(ConfigError, match=f"holds the output folder of another run \\({x}\\)"):
        configure(namespace(), ["--out", str(tmp_path)])
    assert snapshot(x) == before and not (x / "new").exists()
    # a run that hosts runs (check_claims.py, whose experiments write into its folder): runs inside it, not over
    # the files it wrote itself, and it goes on with them inside
    host = tmp_path / "claims"
    outer = configure(namespace(), ["--out", str(host)], hosts_runs=True)
    write_text(host / "report" / "claims.md", "# claims")
    configure(namespace(EPOCHS=3), ["--out", str(host / "e2")]).finish()
    with pytest.raises(ConfigError, match=f"inside the output folder of another run \\({host}\\)"):
        configure(namespace(EPOCHS=3), ["--out", str(host / "report")])
    outer.finish()
    configure(namespace(), ["--out", str(host)], hosts_runs=True).finish()
    configure(namespace(EPOCHS=3), ["--out", str(host / "e2")]).finish()   # the nested run resumes standalone


def test_a_lost_record_leaves_no_stale_figure(tmp_path):
    run, out = started(tmp_path, {"ablation_fraction.png": "old figure", "table.csv": "old\n"})
    run.finish()
    (out / "manifest.json").unlink()
    (out / "config.json").unlink()
    with pytest.raises(ConfigError, match="record of the configuration that wrote this folder .* is missing"):
        configure(namespace(), ["--out", str(out)])
    assert (out / "ablation_fraction.png").exists()
    run = configure(namespace(), ["--out", str(out), "--OVERWRITE=True"])
    assert not (out / "ablation_fraction.png").exists() and not (out / "table.csv").exists()
    write_text(out / "ablation_k.png", "figure")
    run.finish()
    for name in (".written", "manifest.json", "config.json"):   # the journal lost too: nothing can be matched
        (out / name).unlink()
    with pytest.raises(ConfigError, match="holds files this project did not write"):
        configure(namespace(), ["--out", str(out), "--OVERWRITE=True"])


def test_overwrite_never_deletes_the_tuning_it_reuses(tmp_path):
    run, out = started(tmp_path, {"tuning/tuning.json": "{}"})
    run.finish()
    before = snapshot(out)
    for target in (out, out / "again"):
        with pytest.raises(ConfigError, match="--OVERWRITE=True with --TUNED=.*overlap"):
            ns = namespace(TUNED="")
            ns["ACCEPT"]["TUNED"] = text()
            configure(ns, ["--out", str(target), "--EPOCHS=3", "--OVERWRITE=True",
                                            f"--TUNED={out}"])
    assert snapshot(out) == before
    res = script(E3, "--quick", "--ONLY=base", f"--TUNED={out}", "--OVERWRITE=True", "--out", out)
    assert res.returncode == 2 and "overlap" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before


# --- output-folder problems: one line, exit 2 -------------------------------------------------------------------
def test_out_under_a_file_or_unwritable_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    res = script(FIG6, "--quick", "--out", tmp_path / "file" / "sub")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{tmp_path / 'file'} is a file, not a folder" in res.stderr
    monkeypatch.setattr("common.infra.ownership.os.access", lambda p, mode: False)
    with pytest.raises(ConfigError, match="cannot be written"):
        configure(namespace(), ["--out", str(tmp_path / "ro" / "out")])


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from common.infra.outputs import OutputError

    run, out = started(tmp_path, {})

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=f"cannot write {out / 'table.csv'}: No space left on device"):
        write_text(out / "table.csv", "a\n")
    run.release()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    # a script: the disk fills after config.json is written
    code = ("import errno, pathlib, runpy, sys\n"
            "orig = pathlib.Path.write_text\n"
            "def full(self, *a, **k):\n"
            "    if 'config' in self.name: return orig(self, *a, **k)\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "pathlib.Path.write_text = full\n"
            f"sys.argv = ['fig6', '--quick', '--out', {str(tmp_path / 'f6')!r}]\n"
            f"runpy.run_path({str(FIG6)!r}, run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, MPLBACKEND="Agg"))
    assert res.returncode == 2 and "No space left on device" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "cannot write" in res.stderr.strip().splitlines()[-1]


# --- killed runs: workers die with their parent, the lock is free at once -------------------------------------------
def _pids_script(out):
    return (
        "import multiprocessing as mp, os, sys, time\n"
        "from common.experiments import experiment\n"
        "from common.experiments.config import at_least, configure\n"
        "def pid(_):\n"
        "    time.sleep(0.2)\n"
        "    return os.getpid()\n"
        "def train(_):\n"
        "    start = time.time()\n"
        "    while time.time() - start < 60:\n"
        "        pass\n"
        "ns = {'__file__': '/x/demo_script.py', 'EPOCHS': 1, 'ACCEPT': {'EPOCHS': at_least(1)}}\n"
        f"run = configure(ns, ['--out', {str(out)!r}])\n"
        "ctx = mp.get_context('fork')\n"
        "pool = ctx.Pool(2, initializer=experiment._worker_init, initargs=(ctx.RLock(), ctx.Value('i', 0), os.getpid()))\n"
        "pids = sorted(set(pool.map(pid, range(4), chunksize=1)))\n"
        "pool.map_async(train, range(2), chunksize=1)\n"
        "time.sleep(0.5)\n"
        "print(' '.join(map(str, pids)), flush=True)\n"
        "time.sleep(120)\n")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_run_leaves_no_worker_and_no_lock(tmp_path, sig):
    import signal
    import time

    from common.infra.outputs import lock_holder
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _pids_script(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers and lock_holder(out) == proc.pid and all(_state(w) in "RS" for w in workers)   # training
    lock = str((out / ".lock").resolve())
    for w in workers:   # the forked workers do not hold the lock file open (the lock dies with the parent)
        assert lock not in {os.path.realpath(fd) for fd in Path(f"/proc/{w}/fd").iterdir()}, w
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in _state(w)], "workers outlived"
    assert lock_holder(out) is None
    configure(namespace(), ["--out", str(out), "--OVERWRITE=True"]).release()   # taken over at once


def _state(pid) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
