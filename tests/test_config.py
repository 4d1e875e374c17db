"""Top-of-script constants, command-line overrides, run record."""
import json

import pytest

from common.config import ConfigError, configure, derive_seed, parse_value, write_json


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
    (["--LR=fast"], "expected a number"), (["--TIED=maybe"], "expected a boolean"),
    (["--FRACTIONS=0.1,x"], "expected a number"), (["EPOCHS=3"], "unexpected argument"), (["--LR"], "needs a value")])
def test_bad_overrides_are_errors(argv, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        configure(namespace(), argv + ["--out", str(tmp_path)])


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(42, "pam", "fraction", 0.01) == derive_seed(42, "pam", "fraction", 0.01)
    assert len({derive_seed(42, m) for m in ("pam", "sgd", "sgd_tied", "x")}) == 4
    assert parse_value("X", "1e3", 5) == 1000


def test_write_json_is_atomic(tmp_path):
    p = write_json(tmp_path / "a.json", {"x": float("nan"), "y": (1, 2)})
    assert json.loads(p.read_text())["y"] == [1, 2]
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_default_output_folders_keep_quick_runs_apart(tmp_path, monkeypatch):
    import common.config as config
    monkeypatch.setattr(config, "ROOT", tmp_path)
    assert configure(namespace(), []).out == tmp_path / "results" / "demo_script"
    assert configure(namespace(), ["--quick"]).out == tmp_path / "results" / "quick" / "demo_script"
