"""The output folder of a run: the ``Run``, its lock, its journal of written files, atomic writes, the manifest.

``common.experiments.config.configure`` returns a ``Run`` whose output folder (``Run.out``) it has claimed
(``common.infra.ownership``) and locked for the life of the process (``<out>/.lock``, fcntl.flock: a second
writer is refused at once, naming the holder's pid; ``OutputLock``). Every file goes through
``atomic_write`` (a unique temporary file renamed into place) and is listed in ``<out>/.written`` (the
journal); ``Run.finish`` writes ``<out>/manifest.json`` last: the settings, a hash of the code (common/ and
the script), the data hashes the script passes, and every file with its sha256 (docs/DESIGN.md, section 11).

Under torchrun (several processes, ``common.infra.distributed``) only rank 0 writes (``is_writer``:
``atomic_write`` and the manifest do nothing on the other ranks).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[2]   # the repository (common/infra/outputs.py)

LOCK_NAME, JOURNAL_NAME, MANIFEST_NAME, RECORD_NAME = ".lock", ".written", "manifest.json", "config.json"
# constants that change how a run proceeds, not what it computes: a folder is resumed across them
OPERATIONAL = ("WORKERS", "RESUME")


def is_writer() -> bool:
    """Whether this process writes files: always, except under torchrun, where only rank 0 (RANK=0) does; the
    other ranks compute the same results and write nothing (docs/DESIGN.md, section 3.9)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or outside what its constant accepts, or the output folder
    cannot be used (another configuration's results, another process writing)."""


class OutputBusy(ConfigError):
    """Another process holds the output folder's lock."""


class OutputError(ConfigError):
    """A file of the output folder cannot be written (disk full, read-only, permission), or would replace a
    file this project did not write."""


# --- the run -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Run:
    """The resolved run: output folder, base seed, whether --quick was given, and every constant.

    ``configure`` returns it with the output folder locked; ``finish`` writes the manifest and unlocks."""

    name: str
    out: Path
    seed: int
    quick: bool
    values: dict = field(default_factory=dict)
    overwrite: bool = False
    argv: list = field(default_factory=list)
    script: Path | None = None
    lock: "OutputLock | None" = field(default=None, repr=False)
    hosts_runs: bool = False         # other runs may have their output folders inside this one (check_claims.py)
    created: list = field(default_factory=list, repr=False)   # folders this run's claim created
    foreign: set = field(default_factory=set, repr=False)     # files found in the folder that it did not write

    def seed_for(self, *parts) -> int:
        return derive_seed(self.seed, *parts)

    def path(self, *parts) -> Path:
        """A file path under the output folder (its folder created if missing)."""
        p = self.out.joinpath(*[str(q) for q in parts])
        if is_writer():
            p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def dir(self, *parts) -> Path:
        """A folder under the output folder, created if missing."""
        p = self.out.joinpath(*[str(q) for q in parts])
        if is_writer():
            p.mkdir(parents=True, exist_ok=True)
        return p

    def settings(self) -> dict:
        return settings_of(self.name, self.seed, self.values)

    def finish(self, data: dict | None = None) -> Path:
        """Write ``<out>/manifest.json`` (last): settings, code hash, ``data`` (hashes of the inputs, as the
        script knows them), every file this configuration wrote here with its sha256; release the lock.
        Under torchrun only rank 0 writes it."""
        if not is_writer():
            self.release()
            return self.out / MANIFEST_NAME
        files = {}
        for rel in journal(self.out):
            p = self.out / rel
            if p.is_file():
                files[rel] = file_sha256(p)
        manifest = {"script": self.name, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "settings": self.settings(), "quick": self.quick, "argv": self.argv,
            "code": code_hash(self.script), "data": data or {}, "files": dict(sorted(files.items()))}
        path = write_json(self.out / MANIFEST_NAME, manifest)
        self.release()
        return path

    def fail(self, message: str) -> NoReturn:
        """What only the data or an earlier run can tell, found before any training: the error in one line on
        stderr, the folder unlocked (and removed again when this run created it and wrote nothing but its record),
        exit status 2 (as for a bad setting)."""
        print(f"{self.name}: error: {' '.join(message.split())}", file=sys.stderr)
        self.abandon()
        raise SystemExit(2)

    def abandon(self) -> None:
        """Release the folder; a folder this run created, where it wrote nothing but its record, is removed."""
        lock = self.lock
        self.release()
        if not self.created or lock is None or not is_writer():
            return
        if set(journal(self.out)) - {RECORD_NAME} or files_present(self.out) - {RECORD_NAME, JOURNAL_NAME}:
            return
        for name in (RECORD_NAME, JOURNAL_NAME, LOCK_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        for folder in self.created:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def start_journal(self) -> None:
        """From now on list the files written under the (claimed, locked) output folder in its journal, until
        ``release``."""
        _ACTIVE.append(self)

    def release(self) -> None:
        """Unlock the output folder without writing the manifest (idempotent)."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def derive_seed(base: int, *parts) -> int:
    """A seed for one run, derived from the base seed and the run's name.

    Adding or removing a run never changes the seed of another one.
    """
    key = ":".join([str(int(base))] + [str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def show_value(value) -> str:
    """A constant's value as the command line writes it (``a,b,c`` for a list, ``""`` for empty text)."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return '""' if value == "" else str(value)


# --- the runs of this process, the record, the file list -----------------------------------------------
_ACTIVE: list[Run] = []   # runs of this process whose files are being listed


def abandon_all() -> None:
    """Abandon every run of this process (``Run.abandon``): an error ends the process."""
    for run in list(_ACTIVE):
        run.abandon()


def settings_of(name: str, seed: int, constants: dict) -> dict:
    """What identifies a configuration: script, seed and every constant but the operational ones."""
    consts = {k: v for k, v in constants.items() if k not in OPERATIONAL}
    return json.loads(json.dumps(_jsonable({"script": name, "seed": int(seed), "constants": consts}), sort_keys=True))


_TEMPORARY = re.compile(r"^\..+\.tmp")   # atomic_write's temporary files (left by a killed process)


def is_run_folder(p: Path) -> bool:
    """Whether ``p`` is the output folder of a run (it holds a journal, a manifest or a run record)."""
    if (p / JOURNAL_NAME).is_file() or (p / MANIFEST_NAME).is_file():
        return True
    try:
        rec = json.loads((p / RECORD_NAME).read_text())
        return isinstance(rec, dict) and "script" in rec and "constants" in rec
    except (OSError, ValueError):
        return False


def lock_holder(folder) -> int | None:
    """The pid written in ``folder``'s lock when a live process holds the lock, else None."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def files_present(out: Path) -> set[str]:
    """Files under ``out`` (relative paths), except the lock, temporary files of atomic_write and the folders of
    the runs nested in this one."""
    root, found = out.resolve(), set()
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            if is_run_folder(Path(dirpath) / d):
                dirnames.remove(d)
        for f in filenames:
            if f != LOCK_NAME and not _TEMPORARY.match(f):
                found.add((Path(dirpath) / f).relative_to(root).as_posix())
    return found


def journal(out: Path) -> list[str]:
    """The files this folder's configuration wrote (relative paths, first write order, no repeats)."""
    try:
        lines = (Path(out) / JOURNAL_NAME).read_text().splitlines()
    except FileNotFoundError:
        return []
    return list(dict.fromkeys(x for x in lines if x and x not in (MANIFEST_NAME, JOURNAL_NAME, LOCK_NAME)))


def _note_written(path: Path) -> None:
    """List ``path`` in the journal of the active run whose output folder holds it, the innermost one when runs
    are nested (this process only)."""
    if not _ACTIVE:
        return
    resolved = path.resolve()
    roots = [run.out.resolve() for run in _ACTIVE if run.lock is not None and run.lock.pid == os.getpid()]
    roots = sorted((r for r in roots if resolved.is_relative_to(r)), key=lambda r: len(r.parts))
    if roots:
        rel = resolved.relative_to(roots[-1]).as_posix()
        if rel not in (MANIFEST_NAME, JOURNAL_NAME, LOCK_NAME):
            with open(roots[-1] / JOURNAL_NAME, "a") as f:
                f.write(rel + "\n")


class OutputLock:
    """An exclusive lock on an output folder for the life of the process (``<folder>/.lock``, fcntl.flock;
    the file holds the owner's pid and is never deleted). Re-entrant within one process."""

    _held: dict = {}   # resolved folder -> (lock, count), this process

    def __new__(cls, folder):
        folder = Path(folder)
        key = str(folder.resolve())
        held = cls._held.get(key)
        if held is not None and held[0].pid == os.getpid():
            cls._held[key] = (held[0], held[1] + 1)
            return held[0]
        self = super().__new__(cls)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.path, self.pid, self._key = folder, folder / LOCK_NAME, os.getpid(), key
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(self._fd, 64).decode().strip() or "unknown"
            finally:
                os.close(self._fd)
            raise OutputBusy(f"--out {folder}: the folder is in use by another run (process {holder}, lock "
                             f"{self.path}); wait for it to finish or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        cls._held[key] = (self, 1)
        return self

    def __init__(self, folder):
        pass

    @classmethod
    def _drop_inherited(cls) -> None:
        """In a forked child: close the inherited lock files, so the lock dies with the process that took it
        (flock is held while any process keeps the file open: a child outliving its killed parent kept it)."""
        for lock, _ in cls._held.values():
            with contextlib.suppress(OSError):
                os.close(lock._fd)
        cls._held.clear()
        _ACTIVE.clear()

    def release(self) -> None:
        held = self._held.get(self._key)
        if held is None or held[0] is not self or self.pid != os.getpid():
            return
        if held[1] > 1:
            self._held[self._key] = (self, held[1] - 1)
            return
        del self._held[self._key]
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


os.register_at_fork(after_in_child=OutputLock._drop_inherited)


def lock_output(folder) -> OutputLock:
    """Hold ``folder``'s lock (a context manager): every configure() on it in another process is refused."""
    return OutputLock(folder)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_hash(script=None) -> dict:
    """sha256 of the code a run executes: every .py under common/ and the script ({"sha256", "files"})."""
    paths = sorted((ROOT / "common").rglob("*.py")) + ([Path(script)] if script else [])
    files = {}
    for p in paths:
        try:
            files[p.resolve().relative_to(ROOT).as_posix()] = file_sha256(p)
        except ValueError:
            files[str(p)] = file_sha256(p)
    total = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in files.items()).encode()).hexdigest()
    return {"sha256": total, "files": files}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


# --- writing files -----------------------------------------------------------------------------------------
def atomic_write(path, write) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a unique temporary file beside it (``.<stem>.<random>
    .tmp<suffix>``, so tools that read the extension still work), which is then renamed into place; on any
    error the temporary file is removed and ``path`` is untouched. The one way every module writes a file.
    A file under the output folder of this process's run is listed for its manifest. Under torchrun only
    rank 0 writes: on the other ranks this returns ``path`` and writes nothing (``is_writer``)."""
    path = Path(path)
    if not is_writer():
        return path
    _check_not_foreign(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        os.chmod(tmp, 0o644)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if isinstance(err, OSError) and err.errno in _OUTPUT_ERRNOS:
            raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    _note_written(path)
    return path


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                  errno.EFBIG, errno.EIO}


def _check_not_foreign(path: Path) -> None:
    """OutputError when ``path`` is a file that was in an active run's folder before the run and that no run of
    this project wrote (the run never replaces it)."""
    resolved = path.resolve()
    for run in _ACTIVE:
        root = run.out.resolve()
        if run.foreign and resolved.is_relative_to(root) and resolved.relative_to(root).as_posix() in run.foreign:
            raise OutputError(f"refusing to replace {path}: the file was in --out {run.out} before this run and "
                              "was not written by it; move it away or choose another --out")


def write_json(path, obj) -> Path:
    """Write ``obj`` as strict JSON atomically (temp file + rename): an interrupted run leaves no half
    file, and a NaN or infinity is an error naming the file (never a bare ``NaN`` that JSON readers reject)."""
    path = Path(path)
    try:
        text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    except ValueError as err:
        raise ValueError(f"{path}: refusing to write a non-finite number ({err}); use None for a missing value") from None
    return write_text(path, text)


def write_text(path, text: str) -> Path:
    """Write text atomically (``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
