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

Then ``configure`` claims the output folder (``common.infra.ownership``: a folder holding another
configuration's results is refused unless ``--OVERWRITE=True``; the same configuration goes on where it
stopped) and locks it for the life of the process; the returned ``Run`` (``common.infra.outputs``) lists every
file written there and ``Run.finish`` writes its manifest last.

Under torchrun (several processes, ``common.infra.distributed``), ``configure`` joins the process group first;
every rank parses and checks the same settings (a bad value: exit 2 on every rank, reported by rank 0
only), rank 0 alone takes the lock and claims the folder and the others share its outcome, and only rank 0
writes (``common.infra.outputs.is_writer``).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ..infra.outputs import ROOT, ConfigError, Run, abandon_all, show_value
from ..infra.ownership import check_folder, check_writable, take_folder, under_torchrun

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


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


def parse_value(name: str, text: str, default):
    """Parse ``text`` to the type of ``default``; raise ConfigError naming the constant if it fails."""
    def fail(kind):
        raise ConfigError(f"--{name}={text}: expected {kind} (default {show_value(default)})")

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
            raise ConfigError(f"--{name}={show_value(value)}: expected {rule.words(noun, consts)} "
                              f"(default {show_value(default)})")


def usage(namespace: dict, name: str | None = None) -> str:
    """Every option and constant with its default and what it accepts (``--help``)."""
    name = name or Path(namespace.get("__file__", "script")).stem
    consts, accept = _constants(namespace), namespace.get("ACCEPT") or {}
    lines = [f"usage: python {name}.py [--quick] [--out DIR] [--seed N] [--OVERWRITE=True] [--NAME=value ...]", ""]
    for k, v in consts.items():
        noun = _noun(v[0] if isinstance(v, (tuple, list)) and v else v)
        rule = accept.get(k)
        lines.append(f"  --{k}={show_value(v)}" + (f"    {rule.words(noun, consts)}" if rule else ""))
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
    if under_torchrun():
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
        abandon_all()
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
    pairs, is_quick, out, seed, overwrite = _parse_argv(argv, namespace, name, consts)
    _override(consts, defaults, pairs, quick if is_quick else None)
    if "SEED" in consts:
        seed = consts["SEED"]
    seed = 0 if seed is None else seed
    if accept is not None:
        check_constants(dict(consts, **{k: v for k, v in namespace.items() if k in accept and k not in consts}),
                        accept, defaults)
    else:
        for k, v in consts.items():
            if not _type_ok(v, defaults[k]):
                raise ConfigError(f"--{k}={show_value(v)}: expected {_noun(defaults[k])} (default {show_value(defaults[k])})")
    out_dir = _output_folder(out, default_out, name, is_quick, overwrite, consts)
    script = namespace.get("__file__")
    run = Run(name=name, out=out_dir, seed=int(seed), quick=is_quick, values=dict(consts), overwrite=overwrite,
              argv=argv, script=Path(script).resolve() if script and Path(script).is_file() else None,
              hosts_runs=hosts_runs)
    # under torchrun rank 0 alone checks, locks and claims the folder; every rank shares its verdict
    check_folder(run)   # refuse before anything is created, even the lock
    namespace.update(consts)
    take_folder(run)
    return run


def _parse_argv(argv: list, namespace: dict, name: str, consts: dict):
    """The command line read: (the (name, text) pairs of constants, --quick, --out, --seed, --OVERWRITE); --help
    prints ``usage`` and exits."""
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
    return pairs, is_quick, out, seed, overwrite


def _override(consts: dict, defaults: dict, pairs: list, quick: dict | None) -> None:
    """``consts`` updated in place: the script's QUICK overrides (``quick``: given with --quick), then the command
    line's values, each parsed to its default's type."""
    if quick:
        unknown = sorted(set(quick) - set(consts))
        if unknown:
            raise ConfigError(f"QUICK names unknown constants {unknown}")
        consts.update(quick)
    for key, val in pairs:
        const = key.upper().replace("-", "_")
        if const not in consts:
            raise ConfigError(f"unknown option --{key}. Valid names: --quick, --out, --seed, --OVERWRITE, "
                              + ", ".join(f"--{v}" for v in sorted(defaults)))
        consts[const] = parse_value(const, val, defaults[const])


def _output_folder(out, default_out, name: str, is_quick: bool, overwrite: bool, consts: dict) -> Path:
    """--out, else ``default_out``, else results/<name> (results/quick/<name> with --quick), checked writable and,
    with --OVERWRITE, apart from every folder the run reads (``INPUT_FOLDERS``)."""
    # a --quick run never overwrites the figures (or the resumable runs) of a real one
    default = ROOT / "results" / ("quick" if is_quick else "") / name
    out_dir = Path(out) if out else Path(default_out) if default_out else default
    check_writable(out_dir)
    for flag in INPUT_FOLDERS:
        source = consts.get(flag)
        if overwrite and isinstance(source, str) and source and _overlap(out_dir, Path(source)):
            raise ConfigError(f"--OVERWRITE=True with --{flag}={source}: the output folder {out_dir} and the folder "
                              f"--{flag} reads overlap, so --OVERWRITE would delete what --{flag} reuses; choose "
                              "another --out")
    return out_dir


INPUT_FOLDERS = ("TUNED",)   # constants naming a folder a run reads: never inside or around its output with --OVERWRITE


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


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

