"""Top-of-script constants, command-line overrides, what each constant accepts, run record."""
import json

import pytest

from common.experiments.config import above, at_least, box, configure, each, in_range, one_of, parse_value, satisfies
from common.infra.outputs import ConfigError, atomic_write, derive_seed, write_json


def namespace():
    return {"__file__": "/x/demo_script.py", "EPOCHS": 50, "LR": 3e-3, "ACTIVATION": "topk", "TIED": False,
            "FRACTIONS": (0.01, 0.1, 1.0), "ONLY": ("base",), "SEED": 42, "lowercase": 1}


def test_overrides_are_typed_and_written(tmp_path):
    ns = namespace()
    run = configure(ns, ["--EPOCHS=3", "--lr", "1e-2", "--tied=true", "--fractions=0.5,1", "--only", "base,fraction",
                         "--out", str(tmp_path)])
    assert (ns["EPOCHS"], ns["LR"], ns["TIED"], ns["FRACTIONS"], ns["ONLY"]) == (3, 1e-2, True, (0.5, 1.0),
                                                                                ("base", "fraction"))
    assert run.seed == 42 and run.out == tmp_path and not run.quick
    rec = json.loads((tmp_path / "config.json").read_text())
    assert rec["constants"]["EPOCHS"] == 3 and rec["script"] == "demo_script"


def test_quick_applies_first_and_cli_wins(tmp_path):
    ns = namespace()
    run = configure(ns, ["--quick", "--epochs=2", "--out", str(tmp_path), "--seed=7", "--tied"],
                    quick={"EPOCHS": 1, "LR": 0.5})
    assert run.quick and ns["EPOCHS"] == 2 and ns["LR"] == 0.5 and run.seed == 7 and ns["TIED"] is True


@pytest.mark.parametrize("argv,match", [
    (["--EPOCH=3"], "unknown option --EPOCH=?.*Valid names:.*--EPOCHS"),
    (["--EPOCHS=three"], "expected an integer"), (["--EPOCHS=2.5"], "expected an integer"),
    (["--LR=fast"], "expected a number"), (["--TIED=maybe"], "expected true or false"),
    (["--FRACTIONS=0.1,x"], "expected a comma-separated list of numbers"), (["EPOCHS=3"], "unexpected argument"), (["--LR"], "needs a value")])
def test_bad_overrides_are_errors(argv, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        configure(namespace(), argv + ["--out", str(tmp_path)])


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(42, "pam", "fraction", 0.01) == derive_seed(42, "pam", "fraction", 0.01)
    assert len({derive_seed(42, m) for m in ("pam", "sgd", "sgd_tied", "x")}) == 4
    assert parse_value("X", "1e3", 5) == 1000


def test_write_json_is_atomic(tmp_path):
    p = write_json(tmp_path / "a.json", {"x": 1.5, "y": (1, 2)})
    assert json.loads(p.read_text())["y"] == [1, 2]
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_default_output_folders_keep_quick_runs_apart(tmp_path, monkeypatch):
    import common.experiments.config as config
    monkeypatch.setattr(config, "ROOT", tmp_path)
    assert configure(namespace(), []).out == tmp_path / "results" / "demo_script"
    assert configure(namespace(), ["--quick"]).out == tmp_path / "results" / "quick" / "demo_script"


def test_write_json_is_strict_and_names_the_file(tmp_path):
    from common.infra.outputs import write_json
    with pytest.raises(ValueError, match=r"bad\.json: refusing to write a non-finite number"):
        write_json(tmp_path / "bad.json", {"x": [1.0, float("nan")]})
    assert not (tmp_path / "bad.json").exists()
    write_json(tmp_path / "ok.json", {"x": [1.0, None]})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"x": [1.0, None]}


# --- what each constant accepts (ACCEPT), checked before anything is written -----------------------------
def declared():
    ns = namespace()
    ns.update(N_LATENTS=64, K=8, BOX=(-2.0, 2.0, -1.0, 1.0))
    ns["ACCEPT"] = {"EPOCHS": at_least(1), "LR": above(0), "ACTIVATION": one_of("topk", "relu"),
                    "TIED": satisfies(lambda v, c: isinstance(v, bool), "true or false"),
                    "FRACTIONS": each(in_range(0, 1, lo_open=True)), "ONLY": each(one_of("base", "fraction")),
                    "SEED": at_least(0), "N_LATENTS": at_least(1), "K": in_range(1, "N_LATENTS"), "BOX": box("x", "y")}
    return ns


@pytest.mark.parametrize("argv,message", [
    (["--EPOCHS=0"], "--EPOCHS=0: expected an integer >= 1 (default 50)"),
    (["--LR=0"], "--LR=0.0: expected a number > 0"),
    (["--ACTIVATION=tanh"], "--ACTIVATION=tanh: expected one of topk, relu"),
    (["--FRACTIONS=0,1"], "--FRACTIONS=0.0,1.0: expected a non-empty comma-separated list, no repeats, each a number "
                          "in (0, 1]"),
    (["--FRACTIONS=0.5,0.5"], "no repeats"),
    (["--ONLY="], "--ONLY=: expected a non-empty comma-separated list"),   # empty is neither "all" nor "none"
    (["--K=65"], "--K=65: expected an integer in [1, --N_LATENTS (= 64)]"),
    (["--N_LATENTS=4"], "--K=8: expected an integer in [1, --N_LATENTS (= 4)]"),  # the rule names the flag it binds
    (["--BOX=1,0,0,1"], "--BOX=1.0,0.0,0.0,1.0: expected 4 numbers xmin,xmax,ymin,ymax with min < max"),
    (["--SEED=-1"], "--SEED=-1: expected an integer >= 0")])
def test_declared_checks_name_the_flag_and_write_nothing(argv, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        configure(declared(), argv + ["--out", str(out)])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_accept_must_declare_every_constant(tmp_path):
    ns = declared()
    del ns["ACCEPT"]["LR"]
    with pytest.raises(TypeError, match=r"undeclared \['LR'\]"):
        configure(ns, ["--out", str(tmp_path)])


def test_quick_values_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match="--EPOCHS=0: expected an integer >= 1"):
        configure(declared(), ["--quick", "--out", str(tmp_path / "q")], quick={"EPOCHS": 0})
    with pytest.raises(ConfigError, match="--EPOCHS=2.5: expected an integer"):
        configure(declared(), ["--quick", "--out", str(tmp_path / "q")], quick={"EPOCHS": 2.5})
    assert not (tmp_path / "q").exists()


def test_script_entry_prints_one_line_and_exits_2(tmp_path, capsys):
    ns = dict(declared(), __name__="__main__")
    with pytest.raises(SystemExit) as stop:
        configure(ns, ["--EPOCHS=-3", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("demo_script: error: --EPOCHS=-3: expected an integer >= 1")
    assert not (tmp_path / "o").exists()


def test_help_lists_every_constant_with_what_it_accepts(capsys):
    with pytest.raises(SystemExit) as stop:
        configure(declared(), ["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--K=8    an integer in [1, --N_LATENTS (= 64)]" in text and "--ONLY=base" in text


def test_a_rejected_command_leaves_a_finished_record_alone(tmp_path):
    run = configure(declared(), ["--out", str(tmp_path)])
    run.finish()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match="--K=0"):
        configure(declared(), ["--K=0", "--out", str(tmp_path)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_atomic_write_uses_unique_temporary_files_and_cleans_up(tmp_path):
    seen = []

    def record(tmp):
        seen.append(tmp)
        tmp.write_text("x")
    for _ in range(3):
        atomic_write(tmp_path / "a.png", record)
    assert len(set(seen)) == 3 and all(t.name.startswith(".a.") and t.name.endswith(".tmp.png") for t in seen)

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.png", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and (tmp_path / "a.png").read_text() == "x"


SCRIPTS = ["exp_e1_between_kmeans_and_pca_k_1.py", "exp_e1_between_kmeans_and_pca_k_3.py",
           "exp_e1_between_kmeans_and_pca_k_3hard.py", "exp_e1_between_kmeans_and_pca_8d.py",
           "exp_e2_MNIST_SGD_PAM_ablations.py",
           "exp_e3_LLM_SGD_PAM_ablations.py", "fig_5_voronoi_knn_kmeans_power_evolution.py", "fig_6_voronoi_to_power.py",
           "fig_7_voronoi_3d_to_power_2d.py", "check_claims.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_declares_what_each_constant_accepts(name, capsys, monkeypatch):
    """configure() refuses an ACCEPT that misses a constant; --help shows each constant with what it accepts."""
    import importlib.util
    import re
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    spec = importlib.util.spec_from_file_location(f"_help_{Path(name).stem}", root / name)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(SystemExit) as stop:
        spec.loader.exec_module(module)   # E2, E3, check_claims: configure() runs at import
        module.main(["--help"])           # E1 and the figures: in main()
    assert stop.value.code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    assert len(lines) >= 9 and all(re.match(r"  --[A-Z0-9_]+=\S*    \S", line) for line in lines), lines
