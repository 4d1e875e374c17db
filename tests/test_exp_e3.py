"""exp_e3 --quick on synthetic activations: every output, every ablation, all numbers finite."""
import json
import math
import subprocess
import sys
from pathlib import Path

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
    """--ACTIVATIONS=folder --STREAM=True: the folder read through memory maps (common/stream.py) trains what the
    loaded folder trains (the same split and batches; the standardisation accumulated in float64 instead of
    float32, hence agreement to float32 rounding, not bits); a second invocation resumes every run."""
    import torch

    from common.stream import write_shards

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
    """--ACTIVATION_VALUES takes any activation of common/sae.py's table; each run gets the table's penalty
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
