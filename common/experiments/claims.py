"""Verdict rules and the claims report. This docstring is the one place the rules are written down.

Verdicts: holds, does not hold, mixed, inconclusive, uninformative.

Categories (tallied separately, never summed into one count):
    identity         a numerical check of an identity of the paper's theory on random instances: it can fail
                     only through a bug (each check has a negative control in tests/test_theory.py)
    paper-empirical  an empirical claim of the paper (PAM-SGD vs SGD, sample efficiency, ...)
    implementation   a check of our own code (e.g. the decoder step never raises the objective); never
                     counted as evidence for the paper
    beyond-paper     a question the paper does not ask, judged by the same rules (e.g. recovery of known
                     features on ground-truth data)

Comparison rule (``compare``), for the question "is A lower than B?" over replicates:
    The replicates are paired: replicate r of A and of B share the data subset, the initialisation family, the
    mini-batch order and (when tuned) the validation split. d_r = B_r - A_r; diff = mean(d);
    se = sd(d) / sqrt(n) (sample sd, ddof 1); dof = n - 1; the confidence interval is diff -+ t se, t the
    (1 + level) / 2 quantile of Student's t with dof degrees of freedom (level 0.95 unless stated); p is the
    two-sided p-value of diff = 0.
    - Both sides informative: if either side's mean test FVU is >= 1 (no better than predicting the mean), the
      comparison is uninformative, whatever the numbers: a win over such a model is no evidence.
    - holds if the interval lies above 0 (ci_low > 0); does not hold if it lies below 0 (ci_high < 0);
      inconclusive otherwise.
    - Fewer than 2 pairs: inconclusive (no variance estimate); se, dof, p and the interval are undefined (None).
    - Zero spread of the differences: the comparison is exact; se = 0, the interval is [diff, diff], dof is
      undefined (None), p is 0 (1 for an exact tie, which is inconclusive), and the sign of diff decides.
    - Unequal numbers of values on the two sides, any non-finite value, or an empty side is an error
      (ValueError naming the argument).

Family rule (``compare_family``): the settings that make up one claim (e.g. its training fractions) are one
family; Holm's step-down correction holds the family-wise error at 1 - level. The m informative settings are
ordered by p; the i-th smallest (i = 1..m) is decided (holds / does not hold, by the sign of diff) if it and
every smaller one have p <= (1 - level) / (m - i + 1); the rest are inconclusive; its interval is reported at
the level 1 - (1 - level) / (m - i + 1) it was tested at. Uninformative settings are not tested.

Sparsity rule (``sparsity_family``): "A's codes are sparser than B's" holds at a setting only if A's test L0 is
lower (the family rule on L0) and A's test MSE is not worse than B's by more than SPARSITY_MARGIN (5%, fixed
before any number was seen): the family rule on "is A's MSE lower than (1 + SPARSITY_MARGIN) B's?" must hold
too (non-inferiority). L0 lower and that fidelity comparison does not hold: does not hold; inconclusive
otherwise.

Combination rule over the settings of one claim (``combine``): every setting holds -> holds; every setting
does not hold -> does not hold; at least one holds and at least one does not hold -> mixed; every setting
uninformative -> uninformative; otherwise inconclusive (an uninformative setting leaves the claim unjudged
there, so a claim with one cannot hold or fail as a whole). The settings' verdicts are those ``compare``
gives (not mixed). No settings is an error.

Edge rule (``cap_at_edge``): a tuned setting still on the edge of its range after one extension (common/experiments/tuning.py)
caps the verdict of the settings resting on it at inconclusive.

Budget rule (``across_budgets``): a tuned claim is judged at each tuning budget; the same verdict at every
budget -> that verdict, *stable across budgets*; otherwise mixed if one budget holds and another does not
hold, else inconclusive, and the claim *depends on the tuning budget*.

Protocol rule (``across_protocols``, one claim judged under several protocols, e.g. the paper's and a
modern tuned one): the same verdict under every protocol -> that verdict; otherwise mixed if one protocol
holds and another does not hold, else inconclusive. The claim depends on the protocol when the verdicts
differ. A claim with protocols carries exactly this overall verdict and flag.

Agreement rule (``agreement_verdict``, do two metrics rank two methods alike?): at each setting, both metrics'
comparisons (each by the family rule); holds if at least one setting has both decided and every such setting
has the same winner under both; does not hold if some setting has both decided with different winners;
inconclusive otherwise.

E1 rule (``between_verdict``): holds if k-means + local PCA of the SAE's rank <= the exact TopK SAE's MSE <=
k-means' MSE, in every case; does not hold otherwise.

Convergence rule (``convergence_verdict``, PAM's objective after each decoder solve, over many epochs): holds
if in every run the last objective is <= the first, the second half varies by at most 5% of its minimum and
no epoch raises it by more than 1%; does not hold if more than 10% of all epochs raise it by more than 1% or
a run ends above where it began; inconclusive otherwise.

Report (``write_report``): claims.json (strict JSON: a non-finite number is an error naming the claim) and
CLAIMS.md, which opens with the three tallies (one per category), then a table of every claim (verdict per
protocol, overall, whether it depends on the protocol), a section per claim, and the commands run with
their wall times.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from common.infra.outputs import write_text

VERDICTS = ("holds", "does not hold", "mixed", "inconclusive", "uninformative")
CATEGORIES = ("identity", "paper-empirical", "implementation", "beyond-paper")
SPARSITY_MARGIN = 0.05    # a sparser model may have at most this much higher test MSE (fixed before any result)
CATEGORY_TITLES = {
    "identity": "Numerical checks of the theory's identities (can fail only through a bug; each has a negative "
                "control)",
    "paper-empirical": "Paper's empirical claims",
    "implementation": "Implementation checks (our code; never counted as evidence for the paper)",
    "beyond-paper": "Beyond the paper (our questions, the same rules)",
}
SETTING_VERDICTS = ("holds", "does not hold", "inconclusive", "uninformative")  # what compare returns


@dataclass(frozen=True)
class Comparison:
    """The outcome of ``compare``: is A lower than B? (None: undefined, see the module docstring)."""

    verdict: str
    diff: float               # mean(B - A) over pairs: positive when A is lower
    se: float | None
    dof: float | None
    ci_low: float | None
    ci_high: float | None
    n_a: int
    n_b: int
    p: float | None = None    # two-sided p-value of diff = 0
    level: float = 0.95       # the level the interval (and, in a family, the test) was made at


def _values(values, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of numbers, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} has non-finite values: {v.tolist()}")
    return v


def _fvu(value, name: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} is not finite: {value}")
    return value


def _decide(diff: float, lo: float, hi: float) -> str:
    return "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"


def compare(a, b, fvu_a=None, fvu_b=None, level: float = 0.95) -> Comparison:
    """Is A lower than B? A paired t interval on the per-replicate differences B_r - A_r (comparison rule).

    ``a``, ``b``: one value per replicate, in replicate order (pair r = a[r], b[r]); ``fvu_a``, ``fvu_b``: each
    side's mean test FVU (optional).
    """
    a, b = _values(a, "a"), _values(b, "b")
    fvu_a, fvu_b = _fvu(fvu_a, "fvu_a"), _fvu(fvu_b, "fvu_b")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up replicate for replicate: {len(a)} values vs {len(b)}")
    n = len(a)
    d = b - a
    diff = float(d.mean())
    informative = not ((fvu_a is not None and fvu_a >= 1) or (fvu_b is not None and fvu_b >= 1))
    if n < 2:
        return Comparison("inconclusive" if informative else "uninformative", diff, None, None, None, None, n, n,
                          level=level)
    se = float(d.std(ddof=1) / math.sqrt(n))
    if se == 0:  # zero spread of the differences: exact
        dof, half, p = None, 0.0, (1.0 if diff == 0 else 0.0)
    else:
        dof = float(n - 1)
        half = float(student_t.ppf((1 + level) / 2, dof)) * se
        p = float(2 * student_t.sf(abs(diff) / se, dof))
    lo, hi = diff - half, diff + half
    verdict = _decide(diff, lo, hi) if informative else "uninformative"
    return Comparison(verdict, diff, se, dof, lo, hi, n, n, p, level)


def compare_family(settings, level: float = 0.95) -> list[Comparison]:
    """``compare`` for each setting of one claim with Holm's correction (family rule). ``settings``: a list of
    dicts with keys a, b and optionally fvu_a, fvu_b. Returns the comparisons in the given order, each decided
    and with its interval at the level Holm's step tested it at."""
    settings = list(settings)
    if not settings:
        raise ValueError("compare_family needs at least one setting")
    first = [compare(s["a"], s["b"], s.get("fvu_a"), s.get("fvu_b"), level) for s in settings]
    tested = [i for i, c in enumerate(first) if c.verdict != "uninformative" and c.p is not None]
    m = len(tested)
    out = list(first)
    alpha = 1 - level
    stopped = False
    for rank, i in enumerate(sorted(tested, key=lambda i: first[i].p)):
        step_level = 1 - alpha / (m - rank)
        s = settings[i]
        c = compare(s["a"], s["b"], s.get("fvu_a"), s.get("fvu_b"), step_level)
        if stopped or c.p > alpha / (m - rank):
            stopped = True
            c = Comparison("inconclusive", c.diff, c.se, c.dof, c.ci_low, c.ci_high, c.n_a, c.n_b, c.p, step_level)
        out[i] = c
    return out


def sparsity_family(settings, level: float = 0.95, margin: float = SPARSITY_MARGIN) -> tuple[list[str], list, list]:
    """Sparsity rule: (verdict per setting, L0 comparisons, fidelity comparisons). ``settings``: dicts with
    l0_a, l0_b, mse_a, mse_b (per replicate, paired) and fvu_a, fvu_b."""
    settings = list(settings)
    l0 = compare_family([dict(a=s["l0_a"], b=s["l0_b"], fvu_a=s.get("fvu_a"), fvu_b=s.get("fvu_b"))
                         for s in settings], level)
    fid = compare_family([dict(a=s["mse_a"], b=(1 + margin) * np.asarray(s["mse_b"], float), fvu_a=s.get("fvu_a"),
                               fvu_b=s.get("fvu_b")) for s in settings], level)
    verdicts = []
    for c, f in zip(l0, fid):
        if c.verdict in ("uninformative", "does not hold", "inconclusive"):
            verdicts.append(c.verdict)
        else:  # sparser: only with its error within the margin
            verdicts.append({"holds": "holds", "does not hold": "does not hold"}.get(f.verdict, "inconclusive"))
    return verdicts, l0, fid


def agreement_verdict(first, second) -> str:
    """Agreement rule. ``first``, ``second``: per setting, the verdicts of "is A better than B?" under each metric
    (holds: A better; does not hold: B better)."""
    first, second = list(first), list(second)
    if len(first) != len(second) or not first:
        raise ValueError(f"agreement_verdict needs two equally long, non-empty lists, got {len(first)} and {len(second)}")
    decided = [(a, b) for a, b in zip(first, second) if a in ("holds", "does not hold") and b in ("holds", "does not hold")]
    if any(a != b for a, b in decided):
        return "does not hold"
    return "holds" if decided else "inconclusive"


def cap_at_edge(verdict: str, on_edge: bool) -> str:
    """Edge rule: a verdict resting on a tuned setting left on the edge of its range is at most inconclusive."""
    if verdict not in SETTING_VERDICTS:
        raise ValueError(f"a setting's verdict must be one of {SETTING_VERDICTS}, got {verdict!r}")
    return "inconclusive" if on_edge and verdict in ("holds", "does not hold") else verdict


def across_budgets(verdicts: dict) -> tuple[str, bool]:
    """(overall verdict, stable) of a tuned claim judged at several tuning budgets (budget rule)."""
    if not verdicts:
        raise ValueError("across_budgets needs at least one budget's verdict")
    for b, v in verdicts.items():
        if v not in VERDICTS:
            raise ValueError(f"budget {b!r}: verdict must be one of {VERDICTS}, got {v!r}")
    found = set(verdicts.values())
    if len(found) == 1:
        return found.pop(), True
    return ("mixed" if {"holds", "does not hold"} <= found else "inconclusive"), False


def combine(verdicts) -> str:
    """One claim's verdict from its settings' verdicts, by the module's combination rule."""
    verdicts = list(verdicts)
    if not verdicts:
        raise ValueError("combine needs at least one setting's verdict")
    for v in verdicts:
        if v not in SETTING_VERDICTS:
            raise ValueError(f"a setting's verdict must be one of {SETTING_VERDICTS}, got {v!r}")
    if all(v == "holds" for v in verdicts):
        return "holds"
    if all(v == "does not hold" for v in verdicts):
        return "does not hold"
    if "holds" in verdicts and "does not hold" in verdicts:
        return "mixed"
    if all(v == "uninformative" for v in verdicts):
        return "uninformative"
    return "inconclusive"


def across_protocols(verdicts: dict[str, str]) -> tuple[str, bool]:
    """(overall verdict, depends_on_protocol) of a claim judged under several protocols (protocol rule)."""
    if not verdicts:
        raise ValueError("across_protocols needs at least one protocol's verdict")
    for protocol, v in verdicts.items():
        if v not in VERDICTS:
            raise ValueError(f"protocol {protocol!r}: verdict must be one of {VERDICTS}, got {v!r}")
    found = set(verdicts.values())
    if len(found) == 1:
        return found.pop(), False
    return ("mixed" if {"holds", "does not hold"} <= found else "inconclusive"), True


def between_verdict(lower: float, value: float, upper: float) -> str:
    """E1's "between" rule: holds if lower <= value <= upper (k-means + same-rank local PCA <= SAE <= k-means),
    does not hold otherwise."""
    for name, v in (("lower", lower), ("value", value), ("upper", upper)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
    return "holds" if lower <= value <= upper else "does not hold"


def convergence_verdict(objectives: list) -> str:
    """PAM's objective over many epochs (one list per run, the objective after each decoder solve).

    holds if in every run the last objective is <= the first, the second half varies by at most 5% of its
    minimum, and no epoch raises the objective by more than 1%; does not hold if more than 10% of all epochs
    raise it by more than 1%, or a run ends above where it began; inconclusive otherwise."""
    runs = [list(map(float, o)) for o in objectives]
    if not runs or any(len(o) < 2 for o in runs):
        raise ValueError("convergence_verdict needs at least one run of at least 2 epochs")
    if not all(math.isfinite(v) for o in runs for v in o):
        raise ValueError("objectives must be finite")
    rises = sum(b > a * 1.01 for o in runs for a, b in zip(o, o[1:]))
    steps = sum(len(o) - 1 for o in runs)
    if rises > 0.1 * steps or any(o[-1] > o[0] for o in runs):
        return "does not hold"
    settled = all(max(o[len(o) // 2:]) - min(o[len(o) // 2:]) <= 0.05 * min(o[len(o) // 2:]) for o in runs)
    return "holds" if settled and rises == 0 else "inconclusive"


@dataclass
class Claim:
    """One checked claim. ``protocols`` maps protocol -> verdict (empty when judged under one protocol);
    when given, ``verdict`` and ``depends_on_protocol`` must be what ``across_protocols`` makes of it."""

    id: str
    category: str
    statement: str
    source: str
    ran: dict
    numbers: dict
    rule: str
    verdict: str
    links: list[str] = field(default_factory=list)
    note: str = ""
    protocols: dict[str, str] = field(default_factory=dict)
    depends_on_protocol: bool = False
    budgets: dict[str, str] = field(default_factory=dict)   # tuning budget -> verdict (the tuned protocol)
    budget_stable: bool | None = None                      # None: not judged at several budgets

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"claim {self.id}: category must be one of {CATEGORIES}, got {self.category!r}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"claim {self.id}: verdict must be one of {VERDICTS}, got {self.verdict!r}")
        expected = across_protocols(self.protocols) if self.protocols else (self.verdict, False)
        if (self.verdict, self.depends_on_protocol) != expected:
            raise ValueError(f"claim {self.id}: verdict {self.verdict!r} and depends_on_protocol "
                             f"{self.depends_on_protocol} disagree with its protocols {self.protocols} "
                             f"(expected {expected})")
        if self.budgets and self.budget_stable != across_budgets(self.budgets)[1]:
            raise ValueError(f"claim {self.id}: budget_stable {self.budget_stable} disagrees with its budgets "
                             f"{self.budgets}")
        self.links = [str(p) for p in self.links]


def tally(claims) -> dict[str, dict[str, int]]:
    """Count of claims per category and verdict (every category and verdict present, zeros included)."""
    counts = {c: {v: 0 for v in VERDICTS} for c in CATEGORIES}
    for claim in claims:
        counts[claim.category][claim.verdict] += 1
    return counts


def _plain(obj, where: str):
    """``obj`` as plain JSON types (numpy -> Python, tuples -> lists); a non-finite number raises naming
    ``where`` and the path to it."""
    if isinstance(obj, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), where)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}: the report holds finite numbers only")
    return obj


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _budgets(c: Claim) -> str:
    if not c.budgets:
        return "—"
    per = "; ".join(f"{b}: {v}" for b, v in c.budgets.items())
    return per + (", *stable across budgets*" if c.budget_stable else ", *depends on the tuning budget*")


def write_report(out_dir, claims, commands, header: dict) -> None:
    """Write ``out_dir``/claims.json and ``out_dir``/CLAIMS.md.

    ``claims``: the ``Claim`` objects in report order; ``commands``: dicts with ``command``, ``wall_time``
    (seconds) and ``returncode``; ``header``: run metadata (e.g. profile, seeds), written at the top level
    of claims.json and listed under the tallies in CLAIMS.md.
    """
    out_dir = Path(out_dir)
    claims = list(claims)
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ValueError(f"claim ids must be unique: {sorted({i for i in ids if ids.count(i) > 1})}")
    reserved = {"tallies", "claims", "commands"} & set(header)
    if reserved:
        raise ValueError(f"header may not use the report's own keys {sorted(reserved)}")
    counts = tally(claims)
    run = _plain(header, "header")
    report = run | {
        "tallies": counts,
        "claims": [_plain(asdict(c), f"claim {c.id}") for c in claims],
        "commands": _plain(list(commands), "commands"),
    }
    write_text(out_dir / "claims.json", json.dumps(report, indent=2, allow_nan=False) + "\n")

    lines = ["# Claims of SplInterp (arXiv 2505.11836), checked", ""]
    lines += [f"- **{CATEGORY_TITLES[cat]}**: " + ", ".join(f"{v}: {counts[cat][v]}" for v in VERDICTS)
              for cat in CATEGORIES]
    lines += [""] + [f"- {k}: {v}" for k, v in run.items()]
    lines += ["", "Rules: fixed in `common/experiments/claims.py` (module docstring) before any number is seen.", "",
              "| claim | category | verdict per protocol | tuned protocol per budget | overall | depends on protocol |",
              "|---|---|---|---|---|---|"]
    for c in claims:
        per = "; ".join(f"{p}: {v}" for p, v in c.protocols.items()) or "—"
        lines.append(f"| [{c.id}](#{c.id.lower()}) {_cell(c.statement)} | {c.category} | {per} | {_budgets(c)} | "
                     f"**{c.verdict}** | {'yes' if c.depends_on_protocol else 'no'} |")
    for c, plain in zip(claims, report["claims"]):
        lines += ["", f"## {c.id}", "", f"**{c.statement}** — *{c.verdict}* ({c.category})", "",
                  f"- source: {c.source}", f"- ran: `{json.dumps(plain['ran'])}`", f"- rule: {c.rule}",
                  f"- numbers: `{json.dumps(plain['numbers'])}`"]
        if c.protocols:
            lines.append("- verdict per protocol: " + "; ".join(f"{p}: {v}" for p, v in c.protocols.items()))
        if c.budgets:
            lines.append(f"- tuned protocol per tuning budget (trials per study): {_budgets(c)}")
        if c.note:
            lines.append(f"- note: {c.note}")
        if c.links:
            lines.append("- figures and data: " + ", ".join(f"[{p}]({p})" for p in c.links))
    lines += ["", "## Commands run", ""]
    lines += [f"- `{c['command']}` ({c['wall_time']:.0f} s)" for c in report["commands"]]
    write_text(out_dir / "CLAIMS.md", "\n".join(lines) + "\n")


RESULTS_BEGIN = "<!-- generated by check_claims.py from results/claims.json: begin -->"
RESULTS_END = "<!-- generated by check_claims.py from results/claims.json: end -->"


def _num(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def _headline_rows(cid: str, numbers: dict, path=()) -> list[str]:
    """Table rows for every compared setting found in a claim's numbers (any nesting of protocol and budget)."""
    rows = []
    for key, val in numbers.items():
        if not isinstance(val, dict):
            continue
        cmp = val.get("comparison") or val.get("l0_comparison")
        if cmp is not None:
            methods = [m for m, v in val.items() if isinstance(v, dict) and "mean" in v]
            if not methods and "l0" in val:
                methods = [f"{m} L0" for m in val["l0"]]
                means = [val["l0"][m.split()[0]] for m in methods]
            else:
                means = [val[m] for m in methods]
            cells = "; ".join(f"{m} {_num(v['mean'])} ± {_num(v.get('std'))}" for m, v in zip(methods, means))
            rows.append(f"| {cid} | {' / '.join(map(str, path))} | {key} | {cells} | "
                        f"[{_num(cmp['ci_low'])}, {_num(cmp['ci_high'])}] | {val.get('verdict', cmp['verdict'])} |")
        else:
            rows += _headline_rows(cid, val, path + (key,))
    return rows


def results_markdown(report: dict) -> str:
    """The results section of docs/RESULTS.md from a claims report (the dict of claims.json): the run, the
    tallies, every verdict and the numbers behind each compared setting. Figures only; no hand-written text."""
    run = report.get("run", {})
    lines = [RESULTS_BEGIN, "", f"## Claims: `{report['command']}` ({report['profile']} profile)", ""]
    if run:
        lines += [f"- wall time: {run['wall_time_s'] / 60:.1f} min; machine: {run['machine']}; load average "
                  f"{run['load_before']} before, {run['load_after']} after; finished {run['finished_utc']} UTC", ""]
    for cat in CATEGORIES:
        counts = report["tallies"][cat]
        lines.append(f"- **{CATEGORY_TITLES[cat]}**: " + ", ".join(f"{v}: {counts[v]}" for v in VERDICTS))
    lines += ["", "| claim | per protocol | tuned protocol per budget | overall |", "|---|---|---|---|"]
    for c in report["claims"]:
        per = "; ".join(f"{p}: {v}" for p, v in c["protocols"].items()) or "—"
        bud = "—"
        if c.get("budgets"):
            bud = "; ".join(f"{b}: {v}" for b, v in c["budgets"].items()) + (
                " (stable)" if c["budget_stable"] else " (depends on the budget)")
        lines.append(f"| {c['id']} | {per} | {bud} | **{c['verdict']}** |")
    rows = [r for c in report["claims"] if c["category"] != "identity" for r in _headline_rows(c["id"], c["numbers"])]
    if rows:
        lines += ["", "Every compared setting (mean ± sd over replicates; the paired interval of B - A at the level "
                  "it was tested at; the setting's verdict):", "",
                  "| claim | protocol / budget | setting | numbers | interval | verdict |", "|---|---|---|---|---|---|"]
        lines += rows
    lines += ["", "Commands (wall time):", ""]
    lines += [f"- `{c['command']}` ({c['wall_time']:.0f} s)" for c in report["commands"]]
    return "\n".join(lines + ["", RESULTS_END])


def write_results(report: dict, path) -> None:
    """Replace the generated section of ``path`` (docs/RESULTS.md) by ``results_markdown(report)``; the text
    outside the markers (hand-written explanations, benchmark figures with their commands) is kept."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Results\n\n" + RESULTS_BEGIN + "\n" + RESULTS_END + "\n"
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise ValueError(f"{path}: the markers {RESULTS_BEGIN!r} and {RESULTS_END!r} are missing")
    head, rest = text.split(RESULTS_BEGIN, 1)
    _, tail = rest.split(RESULTS_END, 1)
    write_text(path, head + results_markdown(report) + tail)
