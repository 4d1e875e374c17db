"""Top-of-script constants -> command-line overrides, output folder, run record.

A script keeps its hyperparameters as UPPERCASE constants at the top of the file, then calls

    run = configure(globals(), quick=QUICK)

which reads ``sys.argv``:

    --NAME=value  or  --name value   override the constant NAME (type-checked against its default)
    --FLAG                           a boolean constant FLAG set to true
    --quick                          apply the script's QUICK overrides first (tiny, for tests)
    --out DIR                        output folder (default results/<script name>/)
    --seed N                         base seed (default: the script's SEED constant, else 0)

Unknown names and values of the wrong type raise ``ConfigError`` listing what is accepted, before any
work starts. The resolved configuration is written to ``<out>/config.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A command-line override names an unknown constant or has a value of the wrong type."""


@dataclass
class Run:
    """The resolved run: output folder, base seed, whether --quick was given, and every constant."""

    name: str
    out: Path
    seed: int
    quick: bool
    values: dict = field(default_factory=dict)

    def seed_for(self, *parts) -> int:
        return derive_seed(self.seed, *parts)

    def path(self, *parts) -> Path:
        """A file path under the output folder (its folder created if missing)."""
        p = self.out.joinpath(*[str(q) for q in parts])
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def dir(self, *parts) -> Path:
        """A folder under the output folder, created if missing."""
        p = self.out.joinpath(*[str(q) for q in parts])
        p.mkdir(parents=True, exist_ok=True)
        return p


def derive_seed(base: int, *parts) -> int:
    """A seed for one run, derived from the base seed and the run's name.

    Adding or removing a run never changes the seed of another one.
    """
    key = ":".join([str(int(base))] + [str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") & 0x7FFFFFFF


def parse_value(name: str, text: str, default):
    """Parse ``text`` to the type of ``default``; raise ConfigError naming the constant if it fails."""
    def fail(kind):
        raise ConfigError(f"--{name}={text!r}: expected {kind} (default {default!r})")

    if isinstance(default, bool):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        fail("a boolean (true/false/1/0)")
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
        if not items:
            return type(default)()
        if default:
            proto = default[0]
            return type(default)(parse_value(name, t, proto) for t in items)
        return type(default)(items)
    if default is None or isinstance(default, str):
        return text
    fail(f"a value of type {type(default).__name__}")


def _constants(namespace: dict) -> dict:
    return {k: v for k, v in namespace.items()
            if k.isupper() and not k.startswith("_") and k != "QUICK"
            and isinstance(v, (bool, int, float, str, tuple, list, type(None)))}


def configure(namespace: dict, argv=None, quick: dict | None = None, name: str | None = None,
              default_out=None) -> Run:
    """Apply command-line overrides to the UPPERCASE constants of ``namespace`` (a module's globals).

    Returns the ``Run``; also updates ``namespace`` in place so the script reads its constants as usual.
    The output folder is ``--out``, else ``default_out``, else ``results/<name>`` (``results/quick/<name>``
    with ``--quick``; name: the script's stem).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = name or Path(namespace.get("__file__", "script")).stem
    consts = _constants(namespace)
    valid = sorted(consts)

    pairs, is_quick, out, seed = [], False, None, None
    i = 0
    while i < len(argv):
        arg = argv[i]
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
        if not eq and at_end and isinstance(consts.get(key.upper().replace("-", "_")), bool):
            val = "true"  # a bare --FLAG switches a boolean constant on
        elif not eq:
            if at_end:
                raise ConfigError(f"--{key} needs a value (--{key}=value or --{key} value)")
            val = argv[i + 1]
            i += 1
        i += 1
        if key == "out":
            out = val
        elif key == "seed" and "SEED" not in consts:
            seed = parse_value("seed", val, 0)
        else:
            pairs.append((key, val))

    if quick and is_quick:
        unknown = sorted(set(quick) - set(consts))
        if unknown:
            raise ConfigError(f"QUICK names unknown constants {unknown}")
        namespace.update(quick)
        consts.update(quick)
    for key, val in pairs:
        const = key.upper().replace("-", "_")
        if const not in consts:
            raise ConfigError(f"unknown option --{key}. Valid names: --quick, --out, --seed, "
                              + ", ".join(f"--{v}" for v in valid))
        consts[const] = parse_value(const, val, consts[const])
        namespace[const] = consts[const]

    if "SEED" in consts:
        seed = consts["SEED"]
    seed = 0 if seed is None else seed
    # a --quick run never overwrites the figures (or the resumable runs) of a real one
    default = ROOT / "results" / ("quick" if is_quick else "") / name
    out_dir = Path(out) if out else Path(default_out) if default_out else default
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(name=name, out=out_dir, seed=int(seed), quick=is_quick, values=dict(consts))
    write_json(out_dir / "config.json",
               {"script": name, "quick": is_quick, "seed": run.seed, "argv": argv, "constants": consts})
    return run


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


def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON atomically (temp file + rename): an interrupted run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_text(path, text: str) -> Path:
    """Write text atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
