"""exp_e3 --quick on synthetic activations: every output, every ablation, all numbers finite."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "exp_e3_LLM_SGD_PAM_ablations.py"


def test_quick_run_on_synthetic_activations(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "activations.json").read_text())
    assert meta["n_train"] == 360 and meta["n_test"] == 40 and "synthetic" in meta["model"]
    for name in ("curves_base", "latent_stems") + tuple(f"ablation_{a}" for a in (
            "base", "updates", "fraction", "activation", "weight_decay", "mu_nu", "k")):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and (tmp_path / f"{name}.json").exists(), name
    rows = json.loads((tmp_path / "table.json").read_text())
    # base 3 + updates 2 (pam) + fraction 2x3 + activation 2x3 + weight decay 2x3 + mu/nu 2x3 + k 2x3
    assert len(rows) == 3 + 2 + 5 * 6
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("train_mse", "test_mse", "l0", "dead")), r
    relu = [r for r in rows if r["ablation"] == "activation" and r["value"] == "relu"]
    assert {r["activation"] for r in relu} == {"relu"} and len(relu) == 3
    ks = {(r["value"], round(r["l0"])) for r in rows if r["ablation"] == "k" and r["method"] == "pam"}
    assert ks == {(3, 3), (6, 6)}
    assert "## k" in (tmp_path / "summary.md").read_text()


def test_bad_settings_fail_before_extraction(tmp_path):
    for arg, msg in (("--K=5000", "--K=5000: expected an integer in [1, --N_LATENTS (= 4096)]"),
                     ("--SOURCE=web", "--SOURCE=web: expected one of llm, synthetic"),
                     ("--ONLY=base,colour", "--ONLY=base,colour: expected"),
                     ("--FRACTIONS=0,1", "each a number in (0, 1]")):
        res = subprocess.run([sys.executable, str(SCRIPT), arg, "--out", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and msg in res.stderr, (arg, res.stderr[-500:])
    assert not any(tmp_path.iterdir())


def test_streamed_activations_folder_gives_the_loaded_result(tmp_path):
    """--ACTIVATIONS=folder --STREAM=True: the folder read through memory maps (common/infra/stream.py) trains what the
    loaded folder trains (the same split and batches; the standardisation accumulated in float64 instead of
    float32, hence agreement to float32 rounding, not bits); a second invocation resumes every run."""
    import torch

    from common.infra.shards import write_shards

    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(64, 16, generator=g)
    x = (torch.rand(300, 64, generator=g) * (torch.rand(300, 64, generator=g) < 0.1)) @ atoms
    write_shards(x + 0.05 * torch.randn(300, 16, generator=g), tmp_path / "shards", shard_rows=128)
    common = ["--quick", f"--ACTIVATIONS={tmp_path / 'shards'}", "--ONLY=base,fraction", "--N_LATENTS=32", "--K=4",
              "--KS=4"]
    tables = {}
    for stream in (True, False):
        out = tmp_path / f"stream_{stream}"
        res = subprocess.run([sys.executable, str(SCRIPT), *common, f"--STREAM={stream}", "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        tables[stream] = {(r["method"], r["ablation"], str(r["value"])): r for r in json.loads((out / "table.json").read_text())}
        meta = json.loads((out / "activations.json").read_text())
        assert (meta["count"], meta["n_train"], meta["n_test"]) == (300, 270, 30)
        assert meta["read"] == ("streamed through memory maps" if stream else "into memory")
        assert [f["rows"] for f in meta["files"]] == [128, 128, 44]
    assert tables[True].keys() == tables[False].keys() and len(tables[True]) == 3 + 2 * 3
    for key, row in tables[True].items():
        for metric in ("train_mse", "test_mse", "l0", "dead"):
            assert math.isclose(row[metric], tables[False][key][metric], rel_tol=1e-3, abs_tol=1e-6), (key, metric)
    again = subprocess.run([sys.executable, str(SCRIPT), *common, "--STREAM=True", "--out", str(tmp_path / "stream_True")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    # 9 rows, 6 trained runs (the fraction 1.0 runs are the base runs): all 6 reused, none trained
    assert again.returncode == 0 and "6 runs finished earlier" in again.stdout and "; 0 to train" in again.stdout, \
        again.stdout[-2000:]
    for value, bad in (("", "--STREAM=True: expected False, or True with --ACTIVATIONS a folder of shards"),
                       (str(tmp_path / "shards" / "00000.npy"), "--STREAM=True: expected False, or True with")):
        res = subprocess.run([sys.executable, str(SCRIPT), "--quick", f"--ACTIVATIONS={value}", "--STREAM=True",
                              "--out", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and bad in res.stderr, (value, res.stderr[-1000:])


def test_every_activation_of_the_table_runs_with_its_default_penalty(tmp_path):
    """--ACTIVATION_VALUES takes any activation of common/maths/sae.py's table; each run gets the table's penalty
    (jumprelu: L0, relu: L1, TopK and batchtopk: none)."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--ONLY=activation",
                          "--ACTIVATION_VALUES=jumprelu,batchtopk,relu", "--METHODS=pam,sgd", "--L0=0.002"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "table.json").read_text())
    assert sorted((r["value"], r["activation"], r["method"]) for r in rows) == sorted(
        (a, a, m) for a in ("jumprelu", "batchtopk", "relu") for m in ("pam", "sgd"))
    assert all(math.isfinite(float(r["test_mse"])) for r in rows)
    penalties = {}
    for path in (tmp_path / "runs").glob("*.json"):
        s = dict(json.loads(json.loads(path.read_text())["key"])[2])  # the run's key: [method, replicate, settings]
        penalties[s["activation"]] = (s["l1"], s["l0"])
    assert penalties == {"jumprelu": (0.0, 0.002), "batchtopk": (0.0, 0.0), "relu": (1e-5, 0.0)}
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "bad"),
                          "--ACTIVATION=gelu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--ACTIVATION=gelu" in bad.stderr and "jumprelu" in bad.stderr


@pytest.mark.slow  # about a minute: E3's LM-loss wiring end to end (common/maths/lm_eval.py's own tests stay fast)
def test_loss_recovered_on_a_tiny_language_model(tmp_path):
    """--LM_EVAL_TOKENS: every base and fraction row holds the LM scores of its SAE on held-out tokens; a second
    invocation reuses them (and the models), scoring again a run scored under other eval settings; settings without
    held-out texts fail."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_activations import WORDS, save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(WORDS * 60))
    common = ["--quick", "--SOURCE=llm", f"--MODEL={model}", f"--TEXT={corpus}", f"--CACHE_DIR={tmp_path / 'cache'}",
              "--N_TEXTS=200", "--MAX_TOKENS=16", "--ONLY=base,fraction,k", "--METHODS=pam,sgd", "--WORKERS=1"]
    out = tmp_path / "out"

    def e3(*extra, folder=out):
        return subprocess.run([sys.executable, str(SCRIPT), *common, *extra, "--out", str(folder)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    res = e3("--LM_EVAL_TOKENS=150")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "table.json").read_text())
    keys = ("ce_loss_score", "kl_div_score", "ce_sae", "kl_sae", "ce_loss_score_mean", "kl_div_score_mean")
    scored = [r for r in rows if r["ablation"] in ("base", "fraction")]
    assert len(scored) == 2 + 4 and all(math.isfinite(r[k]) for r in scored for k in keys)
    k_rows = {(r["method"], r["value"]): r for r in rows if r["ablation"] == "k"}
    assert not any("ce_sae" in r for (m, v), r in k_rows.items() if v == 3)  # models not kept: not scored
    assert all(k_rows[m, 6]["ce_sae"] == r["ce_sae"] for r in scored if r["ablation"] == "base"  # k 6 is the base run
               for m in [r["method"]])
    base = json.loads((out / "lm_eval.json").read_text())
    assert base["n_tokens"] == 150 and base["n_texts"] == len(base["test_texts"]) and base["layer"] == 2
    for r in scored:  # the scores are the formulas of the row's CE and KL against the baselines
        assert math.isclose(r["ce_loss_score"], (base["ce_zero"] - r["ce_sae"]) / (base["ce_zero"] - base["ce_clean"]))
        assert math.isclose(r["kl_div_score_mean"], (base["kl_mean"] - r["kl_sae"]) / base["kl_mean"])
    full = {r["method"]: r for r in scored if r["ablation"] == "fraction" and r["value"] == 1.0}
    assert all(full[m]["ce_sae"] == r["ce_sae"] for r in scored if r["ablation"] == "base" for m in [r["method"]])
    assert "## Loss recovered on the language model" in (out / "summary.md").read_text()
    assert "ce_loss_score" in (out / "table.csv").read_text().splitlines()[0]

    stale = next((out / "lm_eval").glob("sgd_fraction_0.25_rep0_*.json"))  # scored under other eval settings
    stale.write_text(stale.read_text().replace('"eval": "{', '"eval": "{\\"other\\": 1, '))
    again = e3("--LM_EVAL_TOKENS=150")
    assert again.returncode == 0 and "; 0 to train" in again.stdout, again.stdout[-2000:]
    assert "3 runs scored earlier" in again.stdout and "; 1 to score" in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "table.json").read_text()) == rows and '"other"' not in stale.read_text()

    for extra, msg in ((("--LM_EVAL_TOKENS=100", "--TOKEN_RULE=all"), "--LM_EVAL_TOKENS=100: expected an integer >= 0 and 0 unless --SOURCE=llm"),
                       (("--LM_EVAL_TOKENS=5000",), "--LM_EVAL_TOKENS=5000: n_tokens=5000: the 20 held-out texts")):
        bad = e3(*extra, folder=tmp_path / "bad")
        assert bad.returncode == 2 and msg in bad.stderr, (extra, bad.stderr[-1000:])
