"""Top-of-script constants -> checked command-line overrides, a guarded output folder, a run record.

A script keeps its hyperparameters as UPPERCASE constants at the top of the file, declares right under
them what each one accepts, then calls ``configure``:

    EPOCHS = 50
    FRACTIONS = (0.01, 0.1, 1.0)
    K = 15
    ACCEPT = {"EPOCHS": at_least(1), "FRACTIONS": each(in_range(0, 1, lo_open=True)), "K": in_range(1, "N_LATENTS")}
    run = configure(globals(), quick=QUICK)
    ...
    run.finish()

``configure`` reads ``sys.argv``:

    --NAME=value  or  --name value   override the constant NAME (parsed to the type of its default)
    --FLAG                           a boolean constant FLAG set to true
    --quick                          apply the script's QUICK overrides first (tiny, for tests)
    --out DIR                        output folder (default results/<script name>/, results/quick/... with --quick)
    --seed N                         base seed (default: the script's SEED constant, else 0)
    --OVERWRITE=True                 replace the results of another configuration found in the output folder
    --help                           every constant, its default and what it accepts

Every check runs before anything is written or loaded: the type of each value (its default's), what
``ACCEPT`` declares for it (ranges, choices, non-empty lists; a bound may name another constant, and
``satisfies`` states any rule across constants), the output folder. A bad value raises ``ConfigError``
naming the flag, the value and what is accepted; run as a script (``__name__ == "__main__"``) it is one
line on stderr and exit status 2, no traceback.

The output folder (``Run.out``) is then locked for the life of the process (``<out>/.lock``, fcntl.flock:
a second writer is refused at once, naming the holder's pid). A folder that holds the record
(``config.json`` / ``manifest.json``) of another configuration is refused unless ``--OVERWRITE=True``,
which first removes the files that configuration wrote; the same configuration goes on where it stopped
(E2/E3 reuse their finished runs). Every file goes through ``atomic_write`` (a unique temporary file
renamed into place) and is listed in ``<out>/.written``; ``Run.finish`` writes ``<out>/manifest.json``
last: the settings, a hash of the code (common/ and the script), the data hashes the script passes, and
every file with its sha256.

Under torchrun (several processes, ``common.infra.distributed``), ``configure`` joins the process group first;
every rank parses and checks the same settings (a bad value: exit 2 on every rank, reported by rank 0
only), rank 0 alone takes the lock and claims the folder and the others share its outcome, and only rank 0
writes (``is_writer``: ``atomic_write`` and the manifest do nothing on the other ranks).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[2]   # the repository (common/experiments/config.py)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
LOCK_NAME, JOURNAL_NAME, MANIFEST_NAME, RECORD_NAME = ".lock", ".written", "manifest.json", "config.json"
# constants that change how a run proceeds, not what it computes: a folder is resumed across them
OPERATIONAL = ("WORKERS", "RESUME")


def is_writer() -> bool:
    """Whether this process writes files: always, except under torchrun, where only rank 0 (RANK=0) does; the
    other ranks compute the same results and write nothing (docs/DESIGN.md, section 3.9)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _torchrun() -> bool:
    """Whether torchrun started this process as one of several (without importing torch)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def _on_main(fn):
    """``fn()`` on rank 0 only, its result or error shared with every rank (common.infra.distributed.on_main);
    simply ``fn()`` in a single process."""
    if not _torchrun():
        return fn()
    from ..infra import distributed
    return distributed.on_main(fn)


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or outside what its constant accepts, or the output folder
    cannot be used (another configuration's results, another process writing)."""


class OutputBusy(ConfigError):
    """Another process holds the output folder's lock."""


class OutputError(ConfigError):
    """A file of the output folder cannot be written (disk full, read-only, permission), or would replace a
    file this project did not write."""


# --- what a constant accepts ---------------------------------------------------------------------------
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fill(text: str, consts: dict) -> str:
    try:
        return text.format(**consts)
    except (KeyError, IndexError, ValueError):
        return text


class Accept:
    """What one constant accepts: ``test(value, constants) -> bool`` and ``words(noun, constants)``, the
    phrase an error shows (``noun`` names the value's type, e.g. "an integer"). Combine with ``&``."""

    def __init__(self, test, words):
        self._test, self._words = test, words

    def ok(self, value, consts=None) -> bool:
        try:
            return bool(self._test(value, consts or {}))
        except (TypeError, ValueError, KeyError, IndexError):
            return False

    def words(self, noun: str = "a value", consts=None) -> str:
        return self._words(noun, consts or {})

    def __and__(self, other: "Accept") -> "Accept":
        return Accept(lambda v, c: self.ok(v, c) and other.ok(v, c),
                      lambda n, c: f"{self.words(n, c)} and {other.words(n, c)}")


def _bound(b, consts):
    return consts[b] if isinstance(b, str) else b


def _bound_words(b, consts) -> str:
    if isinstance(b, str):
        return f"--{b}" + (f" (= {consts[b]})" if b in consts else "")
    return f"{b:g}" if isinstance(b, float) else str(b)


def in_range(lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> Accept:
    """A finite number in [lo, hi] (open ends with lo_open / hi_open; None: unbounded). A bound given as a
    string is the value of that constant (e.g. ``in_range(1, "N_LATENTS")``)."""
    def test(v, c):
        if not _number(v):
            return False
        low, high = _bound(lo, c), _bound(hi, c)
        return ((low is None or (v > low if lo_open else v >= low))
                and (high is None or (v < high if hi_open else v <= high)))

    def words(n, c):
        if hi is None:
            return f"{n} {'>' if lo_open else '>='} {_bound_words(lo, c)}" if lo is not None else n
        if lo is None:
            return f"{n} {'<' if hi_open else '<='} {_bound_words(hi, c)}"
        return (f"{n} in {'(' if lo_open else '['}{_bound_words(lo, c)}, {_bound_words(hi, c)}"
                f"{')' if hi_open else ']'}")
    return Accept(test, words)


def at_least(lo) -> Accept:
    """A finite number >= lo (lo: a number or the name of another constant)."""
    return in_range(lo, None)


def above(lo) -> Accept:
    """A finite number > lo."""
    return in_range(lo, None, lo_open=True)


def finite() -> Accept:
    """Any finite number."""
    return in_range(None, None)


def one_of(*choices) -> Accept:
    """One of ``choices``."""
    return Accept(lambda v, c: v in choices, lambda n, c: "one of " + ", ".join(map(str, choices)))


def boolean() -> Accept:
    return Accept(lambda v, c: isinstance(v, bool), lambda n, c: "true or false")


def text() -> Accept:
    """Any text (possibly empty)."""
    return Accept(lambda v, c: isinstance(v, str), lambda n, c: "any text")


def non_empty() -> Accept:
    """Text that is not blank."""
    return Accept(lambda v, c: isinstance(v, str) and bool(v.strip()), lambda n, c: "non-empty text")


def each(item: Accept, length: int | None = None, distinct: bool = True) -> Accept:
    """A NON-EMPTY list (``--NAME=a,b,c``) whose every element is accepted by ``item``; ``distinct``: no
    value twice; ``length``: exactly that many elements. Empty is never "all" nor "none": it is refused."""
    def test(v, c):
        return (isinstance(v, (tuple, list)) and len(v) >= 1 and (length is None or len(v) == length)
                and (not distinct or len(set(map(repr, v))) == len(v)) and all(item.ok(x, c) for x in v))

    def words(n, c):
        size = f"{length} comma-separated values" if length else "a non-empty comma-separated list"
        return f"{size}{', no repeats' if distinct else ''}, each {item.words(n, c)}"
    return Accept(test, words)


def box(*axes: str) -> Accept:
    """2 numbers per axis, (min, max) of each, min < max: ``box("x", "y")`` is (xmin, xmax, ymin, ymax)."""
    names = ",".join(f"{a}min,{a}max" for a in axes)
    return Accept(lambda v, c: (isinstance(v, (tuple, list)) and len(v) == 2 * len(axes) and all(map(_number, v))
                                and all(v[2 * i] < v[2 * i + 1] for i in range(len(axes)))),
                  lambda n, c: f"{2 * len(axes)} numbers {names} with min < max")


def satisfies(test, words: str) -> Accept:
    """Any rule: ``test(value, constants) -> bool``; ``words`` (``{NAME}`` fields are filled with the
    constants' values) say what is accepted, e.g. ``satisfies(lambda n, c: n % 2 == 0, "an even number")``."""
    return Accept(test, lambda n, c: _fill(words, c))


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
    _lock: "OutputLock | None" = field(default=None, repr=False)
    hosts_runs: bool = False         # other runs may have their output folders inside this one (check_claims.py)
    _created: list = field(default_factory=list, repr=False)   # folders this run's claim created
    _foreign: set = field(default_factory=set, repr=False)     # files found in the folder that it did not write

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
        return _settings(self.name, self.seed, self.values)

    def finish(self, data: dict | None = None) -> Path:
        """Write ``<out>/manifest.json`` (last): settings, code hash, ``data`` (hashes of the inputs, as the
        script knows them), every file this configuration wrote here with its sha256; release the lock.
        Under torchrun only rank 0 writes it."""
        if not is_writer():
            self.release()
            return self.out / MANIFEST_NAME
        files = {}
        for rel in _journal(self.out):
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
        lock = self._lock
        self.release()
        if not self._created or lock is None or not is_writer():
            return
        if set(_journal(self.out)) - {RECORD_NAME} or _present(self.out) - {RECORD_NAME, JOURNAL_NAME}:
            return
        for name in (RECORD_NAME, JOURNAL_NAME, LOCK_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.out / name).unlink()
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def release(self) -> None:
        """Unlock the output folder without writing the manifest (idempotent)."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def derive_seed(base: int, *parts) -> int:
    """A seed for one run, derived from the base seed and the run's name.

    Adding or removing a run never changes the seed of another one.
    """
    key = ":".join([str(int(base))] + [str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def parse_value(name: str, text: str, default):
    """Parse ``text`` to the type of ``default``; raise ConfigError naming the constant if it fails."""
    def fail(kind):
        raise ConfigError(f"--{name}={text}: expected {kind} (default {_show(default)})")

    if isinstance(default, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        fail("true or false (or 1/0, yes/no)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                fail("an integer")
            if not as_float.is_integer():
                fail("an integer")
            return int(as_float)
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            fail("a number")
    if isinstance(default, (tuple, list)):
        items = [t for t in (s.strip() for s in text.split(",")) if t]
        if default:
            proto = default[0]
            try:
                return type(default)(parse_value(name, t, proto) for t in items)
            except ConfigError:
                fail("a comma-separated list of " + {"a boolean": "booleans", "an integer": "integers",
                                                     "a number": "numbers"}.get(_noun(proto), "values"))
        return type(default)(items)
    if default is None or isinstance(default, str):
        return text
    fail(f"a value of type {type(default).__name__}")


def _noun(default) -> str:
    if isinstance(default, bool):
        return "a boolean"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "text"
    return "a value"


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return '""' if value == "" else str(value)


def _type_ok(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return True


def _assigned(path) -> set | None:
    """Names a script assigns at its top level (None when its source cannot be read)."""
    import ast
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, TypeError, ValueError):
        return None
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _constants(namespace: dict) -> dict:
    """The UPPERCASE constants a script assigns itself (imported names such as RECIPES are not settings)."""
    own = _assigned(namespace["__file__"]) if namespace.get("__file__") else None
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and k not in ("QUICK", "ACCEPT") and (own is None or k in own)
            and isinstance(v, (bool, int, float, str, tuple, list, type(None)))}


def check_constants(consts: dict, accept: dict, defaults: dict | None = None) -> None:
    """Raise ConfigError for the first constant (in ``accept``'s order) whose value is of the wrong type or
    not accepted; the message names the flag, the value and what is accepted."""
    defaults = consts if defaults is None else defaults
    for name, rule in accept.items():
        if name not in consts:
            continue
        value, default = consts[name], defaults.get(name, consts[name])
        noun = _noun(default[0] if isinstance(default, (tuple, list)) and default else default)
        if not _type_ok(value, default) or not rule.ok(value, consts):
            raise ConfigError(f"--{name}={_show(value)}: expected {rule.words(noun, consts)} "
                              f"(default {_show(default)})")


def usage(namespace: dict, name: str | None = None) -> str:
    """Every option and constant with its default and what it accepts (``--help``)."""
    name = name or Path(namespace.get("__file__", "script")).stem
    consts, accept = _constants(namespace), namespace.get("ACCEPT") or {}
    lines = [f"usage: python {name}.py [--quick] [--out DIR] [--seed N] [--OVERWRITE=True] [--NAME=value ...]", ""]
    for k, v in consts.items():
        noun = _noun(v[0] if isinstance(v, (tuple, list)) and v else v)
        rule = accept.get(k)
        lines.append(f"  --{k}={_show(v)}" + (f"    {rule.words(noun, consts)}" if rule else ""))
    return "\n".join(lines)


def configure(namespace: dict, argv=None, quick: dict | None = None, name: str | None = None,
              default_out=None, hosts_runs: bool = False) -> Run:
    """Apply command-line overrides to the UPPERCASE constants of ``namespace`` (a module's globals), check
    everything, then claim the output folder (module docstring).

    Returns the ``Run``; also updates ``namespace`` in place so the script reads its constants as usual.
    The output folder is ``--out``, else ``default_out``, else ``results/<name>`` (``results/quick/<name>``
    with ``--quick``; name: the script's stem). ``hosts_runs``: other runs write their output folders inside this
    one (check_claims.py's experiments); otherwise a folder inside or above another run's is refused. Raises
    ConfigError, or, when ``namespace`` is a script run
    as ``__main__``, prints it as one line on stderr and exits with status 2.
    """
    name = name or Path(namespace.get("__file__", "script")).stem
    if _torchrun():
        from ..infra import distributed
        distributed.init()
        distributed.quiet_others()   # rank 0 alone reports, including the errors below
    try:
        run = _configure(namespace, argv, quick, name, default_out, hosts_runs)
    except ConfigError as err:
        if namespace.get("__name__") != "__main__":
            raise
        print(f"{name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    if namespace.get("__name__") == "__main__":
        _one_line_errors(name)
    return run


def _one_line_errors(name: str) -> None:
    """In a script: an uncaught ConfigError (bad setting, output folder unusable: full, read-only) or DataError
    (bad data) met after ``configure`` is one line on stderr and exit status 2, as for a bad setting; the
    runs of this process release their folders first. Anything else keeps its traceback (a bug)."""
    from ..infra.data import DataError

    previous = sys.excepthook

    def hook(kind, err, tb):
        if not issubclass(kind, (ConfigError, DataError)):
            return previous(kind, err, tb)
        print(f"{name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        for run in list(_ACTIVE):
            run.abandon()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.excepthook = hook


def _configure(namespace, argv, quick, name, default_out, hosts_runs=False) -> Run:
    argv = list(sys.argv[1:] if argv is None else argv)
    consts = _constants(namespace)
    defaults = dict(consts)
    accept = namespace.get("ACCEPT")
    if accept is not None:
        missing = [k for k in consts if k not in accept]
        extra = [k for k in accept if k not in namespace]
        if missing or extra:  # the script's own mistake, not the user's
            raise TypeError(f"{name}: ACCEPT must declare every constant: undeclared {missing}, unknown {extra}")
    valid = sorted(consts)

    pairs, is_quick, out, seed, overwrite = [], False, None, None, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--help", "-h"):
            print(usage(namespace, name))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --NAME=value. Valid names: {', '.join(valid)}")
        key, eq, val = arg[2:].partition("=")
        if key == "quick":
            if eq:
                raise ConfigError("--quick takes no value")
            is_quick = True
            i += 1
            continue
        at_end = i + 1 >= len(argv) or argv[i + 1].startswith("--")
        is_flag = isinstance(consts.get(key.upper().replace("-", "_")), bool) or key.upper() == "OVERWRITE"
        if not eq and at_end and is_flag:
            val = "true"  # a bare --FLAG switches a boolean on
        elif not eq:
            if at_end:
                raise ConfigError(f"--{key} needs a value (--{key}=value or --{key} value)")
            val = argv[i + 1]
            i += 1
        i += 1
        if key == "out":
            if not val.strip():
                raise ConfigError("--out=: expected a folder")
            out = val
        elif key == "seed" and "SEED" not in consts:
            seed = parse_value("seed", val, 0)
        elif key.upper() == "OVERWRITE" and "OVERWRITE" not in consts:
            overwrite = parse_value("OVERWRITE", val, False)
        else:
            pairs.append((key, val))

    if quick and is_quick:
        unknown = sorted(set(quick) - set(consts))
        if unknown:
            raise ConfigError(f"QUICK names unknown constants {unknown}")
        consts.update(quick)
    for key, val in pairs:
        const = key.upper().replace("-", "_")
        if const not in consts:
            raise ConfigError(f"unknown option --{key}. Valid names: --quick, --out, --seed, --OVERWRITE, "
                              + ", ".join(f"--{v}" for v in valid))
        consts[const] = parse_value(const, val, defaults[const])
    if "SEED" in consts:
        seed = consts["SEED"]
    seed = 0 if seed is None else seed
    if accept is not None:
        check_constants(dict(consts, **{k: v for k, v in namespace.items() if k in accept and k not in consts}),
                        accept, defaults)
    else:
        for k, v in consts.items():
            if not _type_ok(v, defaults[k]):
                raise ConfigError(f"--{k}={_show(v)}: expected {_noun(defaults[k])} (default {_show(defaults[k])})")

    # a --quick run never overwrites the figures (or the resumable runs) of a real one
    default = ROOT / "results" / ("quick" if is_quick else "") / name
    out_dir = Path(out) if out else Path(default_out) if default_out else default
    _check_writable(out_dir)
    for flag in INPUT_FOLDERS:
        source = consts.get(flag)
        if overwrite and isinstance(source, str) and source and _overlap(out_dir, Path(source)):
            raise ConfigError(f"--OVERWRITE=True with --{flag}={source}: the output folder {out_dir} and the folder "
                              f"--{flag} reads overlap, so --OVERWRITE would delete what --{flag} reuses; choose "
                              "another --out")
    script = namespace.get("__file__")
    run = Run(name=name, out=out_dir, seed=int(seed), quick=is_quick, values=dict(consts), overwrite=overwrite,
              argv=argv, script=Path(script).resolve() if script and Path(script).is_file() else None,
              hosts_runs=hosts_runs)
    # under torchrun rank 0 alone checks, locks and claims the folder; every rank shares its verdict
    _on_main(lambda: _claim_folder(run, check_only=True))   # refuse before anything is created, even the lock
    namespace.update(consts)
    _on_main(lambda: _take_folder(run))
    return run


def _take_folder(run: Run) -> None:
    """Lock the output folder, claim it (``_claim_folder``) and write the configuration's record."""
    run._created = [p for p in (run.out, *run.out.parents) if not p.exists()]
    try:
        run._lock = OutputLock(run.out)
    except OSError as err:
        raise OutputError(f"--out {run.out}: cannot create or lock the folder ({err.strerror or err})") from None
    try:
        _claim_folder(run, check_only=False)
    except BaseException:
        run.release()
        raise
    _ACTIVE.append(run)
    write_json(run.out / RECORD_NAME, {"format": 2, "script": run.name, "quick": run.quick, "seed": run.seed,
                                      "argv": run.argv, "constants": run.values, "hosts_runs": run.hosts_runs})


# --- the output folder: record, lock, file list ----------------------------------------------------------
_ACTIVE: list[Run] = []   # runs of this process whose files are being listed


def _settings(name: str, seed: int, constants: dict) -> dict:
    """What identifies a configuration: script, seed and every constant but the operational ones."""
    consts = {k: v for k, v in constants.items() if k not in OPERATIONAL}
    return json.loads(json.dumps(_jsonable({"script": name, "seed": int(seed), "constants": consts}), sort_keys=True))


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
                return _settings(rec["script"], rec["seed"], consts), rec
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
            diffs.append(f"--{k} {_show(oc.get(k, '(none)'))} there, {_show(nc.get(k, '(none)'))} here")
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
    listed = set(_journal(out)) | set((rec or {}).get("files") or {})
    present = _present(out)
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
            run._foreign = present - listed - {RECORD_NAME, JOURNAL_NAME, MANIFEST_NAME}
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
    run._foreign = _present(out) - {RECORD_NAME}


INPUT_FOLDERS = ("TUNED",)   # constants naming a folder a run reads: never inside or around its output with --OVERWRITE
_TEMPORARY = re.compile(r"^\..+\.tmp")   # atomic_write's temporary files (left by a killed process)


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _some(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_writable(out: Path) -> None:
    """ConfigError when ``out`` cannot be a folder: it or a folder above it is a file, or the nearest existing
    folder cannot be written."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"--out {out}: {p} is a file, not a folder; choose another --out")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {out}: the folder {p} cannot be written (permission denied or read-only)")
            return


def _is_run_folder(p: Path) -> bool:
    """Whether ``p`` is the output folder of a run (it holds a journal, a manifest or a run record)."""
    if (p / JOURNAL_NAME).is_file() or (p / MANIFEST_NAME).is_file():
        return True
    try:
        rec = json.loads((p / RECORD_NAME).read_text())
        return isinstance(rec, dict) and "script" in rec and "constants" in rec
    except (OSError, ValueError):
        return False


def _hosts_runs(p: Path) -> bool:
    """Whether the run of folder ``p`` hosts other runs' folders inside it (its config.json says so)."""
    try:
        return json.loads((p / RECORD_NAME).read_text()).get("hosts_runs") is True
    except (OSError, ValueError, AttributeError):
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


def _nesting(out: Path, hosts_runs: bool) -> None:
    """ConfigError when ``out`` is inside or above another run's output folder. A run that hosts runs
    (``configure(hosts_runs=True)``: check_claims.py, whose experiments write into its folder) may hold run
    folders, and a run may be placed inside it, unless that folder holds files the host wrote itself."""
    resolved = out.resolve()
    for above in resolved.parents:
        if _is_run_folder(above):
            rel = resolved.relative_to(above).as_posix()
            if _hosts_runs(above) and not any(f == rel or f.startswith(rel + "/") for f in _journal(above)):
                break
            raise ConfigError(f"--out {out}: inside the output folder of another run ({above}); choose a folder "
                              "outside it")
    if resolved.is_dir() and not hosts_runs:
        for dirpath, dirnames, _ in os.walk(resolved):
            for d in dirnames:
                if _is_run_folder(Path(dirpath) / d):
                    raise ConfigError(f"--out {out}: the folder holds the output folder of another run "
                                      f"({Path(dirpath) / d}); choose another --out")


def _present(out: Path) -> set[str]:
    """Files under ``out`` (relative paths), except the lock, temporary files of atomic_write and the folders of
    the runs nested in this one."""
    root, found = out.resolve(), set()
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            if _is_run_folder(Path(dirpath) / d):
                dirnames.remove(d)
        for f in filenames:
            if f != LOCK_NAME and not _TEMPORARY.match(f):
                found.add((Path(dirpath) / f).relative_to(root).as_posix())
    return found


def _journal(out: Path) -> list[str]:
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
    roots = [run.out.resolve() for run in _ACTIVE if run._lock is not None and run._lock.pid == os.getpid()]
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


def script_constants(path) -> dict:
    """A script's UPPERCASE constants with literal values, read from its source without running it (so a
    caller such as check_claims.py reads the paper's settings from the script that owns them)."""
    import ast
    tree = ast.parse(Path(path).read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    out[name] = ast.literal_eval(node.value)
                except ValueError:
                    pass  # not a literal (e.g. a value computed from another module)
    return out


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
        if run._foreign and resolved.is_relative_to(root) and resolved.relative_to(root).as_posix() in run._foreign:
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
