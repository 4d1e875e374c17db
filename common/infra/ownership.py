"""Whether a run may use an output folder, decided before anything is written (docs/DESIGN.md, section 11).

A folder inside or above another run's output folder is refused (except inside a run that hosts runs:
check_claims.py). A folder that holds the record (``config.json`` / ``manifest.json``) of another configuration
is refused unless ``--OVERWRITE=True``, which first removes the files that configuration wrote (its journal); the
same configuration goes on where it stopped (E2/E3 reuse their finished runs). A folder holding files this
project did not write is refused. Every refusal is a ``ConfigError`` naming the folder and what to do.

Under torchrun rank 0 alone checks, locks and claims the folder; the other ranks share its outcome.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .outputs import (JOURNAL_NAME, MANIFEST_NAME, RECORD_NAME, ConfigError, OutputError, OutputLock, Run,
                      files_present, is_run_folder, journal, settings_of, show_value, write_json)


def under_torchrun() -> bool:
    """Whether torchrun started this process as one of several (without importing torch)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def _on_main(fn):
    """``fn()`` on rank 0 only, its result or error shared with every rank (common.infra.distributed.on_main);
    simply ``fn()`` in a single process."""
    if not under_torchrun():
        return fn()
    from . import distributed
    return distributed.on_main(fn)


def check_folder(run: Run) -> None:
    """ConfigError when ``run`` may not use its output folder (``_claim_folder``), found before anything is created,
    even the lock."""
    _on_main(lambda: _claim_folder(run, check_only=True))


def take_folder(run: Run) -> None:
    """Lock ``run``'s output folder, claim it (removing an earlier configuration's files under --OVERWRITE) and
    write the configuration's record."""
    _on_main(lambda: _take_folder(run))


def _take_folder(run: Run) -> None:
    """Lock the output folder, claim it (``_claim_folder``) and write the configuration's record."""
    run.created = [p for p in (run.out, *run.out.parents) if not p.exists()]
    try:
        run.lock = OutputLock(run.out)
    except OSError as err:
        raise OutputError(f"--out {run.out}: cannot create or lock the folder ({err.strerror or err})") from None
    try:
        _claim_folder(run, check_only=False)
    except BaseException:
        run.release()
        raise
    run.start_journal()
    write_json(run.out / RECORD_NAME, {"format": 2, "script": run.name, "quick": run.quick, "seed": run.seed,
                                      "argv": run.argv, "constants": run.values, "hosts_runs": run.hosts_runs})


def _record(out: Path, known) -> tuple[dict | None, dict | None]:
    """(settings recorded in the folder or None, the raw record): the manifest's, else config.json's. A
    config.json of an older version (no "format") also listed imported names (e.g. RECIPES) as constants:
    only the ``known`` constants are compared."""
    for fname in (MANIFEST_NAME, RECORD_NAME):
        p = out / fname
        if p.is_file():
            try:
                rec = json.loads(p.read_text())
                if fname == MANIFEST_NAME:
                    return rec["settings"], rec
                consts = rec["constants"] if "format" in rec else {k: v for k, v in rec["constants"].items()
                                                                   if k in known}
                return settings_of(rec["script"], rec["seed"], consts), rec
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None, None


def _differences(old: dict, new: dict) -> str:
    diffs = []
    if old.get("script") != new.get("script"):
        diffs.append(f"script {old.get('script')} there, {new.get('script')} here")
    if old.get("seed") != new.get("seed"):
        diffs.append(f"seed {old.get('seed')} there, {new.get('seed')} here")
    oc, nc = old.get("constants", {}), new.get("constants", {})
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k) != nc.get(k):
            diffs.append(f"--{k} {show_value(oc.get(k, '(none)'))} there, {show_value(nc.get(k, '(none)'))} here")
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


def _claim_folder(run: Run, check_only: bool) -> None:
    """Own the output folder (docs/DESIGN.md, section 11): refuse a folder inside or above another run's folder, a
    folder holding files this project did not write (no record), and one holding another configuration or a
    lost record (unless --OVERWRITE, which first removes the files its journal lists)."""
    out = run.out
    _nesting(out, run.hosts_runs)
    if not out.is_dir():
        return
    recorded, rec = _record(out, run.values)
    listed = set(journal(out)) | set((rec or {}).get("files") or {})
    present = files_present(out)
    if recorded is None:
        if not present:
            return
        if not (out / JOURNAL_NAME).exists():
            raise ConfigError(f"--out {out}: the folder holds files this project did not write "
                              f"({_some(present)}); choose an empty or new folder")
        if not run.overwrite:
            raise ConfigError(f"--out {out}: the record of the configuration that wrote this folder ({RECORD_NAME}, "
                              f"{MANIFEST_NAME}) is missing, so its {len(listed)} files cannot be matched to this one; "
                              "add --OVERWRITE=True to remove them, or choose another --out")
        rec = {}
    elif recorded == run.settings():
        if not check_only and (out / JOURNAL_NAME).exists():   # (an older version's folder kept no journal)
            run.foreign = present - listed - {RECORD_NAME, JOURNAL_NAME, MANIFEST_NAME}
            with contextlib.suppress(FileNotFoundError):
                (out / MANIFEST_NAME).unlink()   # in progress again: the manifest is rewritten at the end
        return
    elif not run.overwrite:
        raise ConfigError(f"--out {out}: the folder holds the results of another configuration "
                          f"({_differences(recorded, run.settings())}); add --OVERWRITE=True to replace them, "
                          "or choose another --out")
    if not (out / JOURNAL_NAME).exists() and "files" not in rec:
        raise ConfigError(f"--OVERWRITE: {out} was written by an older version that kept no list of its files; "
                          "remove the folder yourself or choose another --out")
    if check_only:
        return
    print(f"--OVERWRITE: removing the {len(listed)} files of the earlier configuration in {out}", file=sys.stderr)
    root = out.resolve()
    for rel in sorted(listed | {RECORD_NAME, MANIFEST_NAME, JOURNAL_NAME}):
        p = (out / rel)
        if not p.resolve().is_relative_to(root) or not p.is_file():
            continue
        p.unlink()
        parent = p.parent
        while parent.resolve() != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    run.foreign = files_present(out) - {RECORD_NAME}


def _some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_writable(out: Path) -> None:
    """ConfigError when ``out`` cannot be a folder: it or a folder above it is a file, or the nearest existing
    folder cannot be written."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"--out {out}: {p} is a file, not a folder; choose another --out")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {out}: the folder {p} cannot be written (permission denied or read-only)")
            return


def _hosts_runs(p: Path) -> bool:
    """Whether the run of folder ``p`` hosts other runs' folders inside it (its config.json says so)."""
    try:
        return json.loads((p / RECORD_NAME).read_text()).get("hosts_runs") is True
    except (OSError, ValueError, AttributeError):
        return False


def _nesting(out: Path, hosts_runs: bool) -> None:
    """ConfigError when ``out`` is inside or above another run's output folder. A run that hosts runs
    (``configure(hosts_runs=True)``: check_claims.py, whose experiments write into its folder) may hold run
    folders, and a run may be placed inside it, unless that folder holds files the host wrote itself."""
    resolved = out.resolve()
    for above in resolved.parents:
        if is_run_folder(above):
            rel = resolved.relative_to(above).as_posix()
            if _hosts_runs(above) and not any(f == rel or f.startswith(rel + "/") for f in journal(above)):
                break
            raise ConfigError(f"--out {out}: inside the output folder of another run ({above}); choose a folder "
                              "outside it")
    if resolved.is_dir() and not hosts_runs:
        for dirpath, dirnames, _ in os.walk(resolved):
            for d in dirnames:
                if is_run_folder(Path(dirpath) / d):
                    raise ConfigError(f"--out {out}: the folder holds the output folder of another run "
                                      f"({Path(dirpath) / d}); choose another --out")
