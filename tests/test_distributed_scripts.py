"""E2 under torchrun (gloo, 2 processes, tests/dist_script.py): the table of one process, one set of output
files with nothing written by rank 1, one copy of every message; a second invocation resumes (65 s here:
`slow`). A bad setting or a busy output folder exits 2 on both ranks, reported once (5 s each, in `make test`)."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.infra.outputs import lock_output

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "exp_e2_MNIST_SGD_PAM_ablations.py"
WRAPPER = Path(__file__).resolve().parent / "dist_script.py"
ARGS = ["--quick", "--ONLY=base", "--ACTIVATIONS=topk"]   # 3 runs (pam, sgd, sgd_tied), 2 epochs each
ENV = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", SPLINTERP_DIST_TIMEOUT="60")
needs_mnist = pytest.mark.skipif(not (ROOT / "data" / "mnist" / "train-images-idx3-ubyte").exists(),
                                 reason="MNIST not fetched")


def torchrun(out, *args, timeout=300, monitor_s=0.1):
    """``monitor_s``: how often torchrun looks at its ranks; when one fails it stops the others (SIGTERM)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--monitor-interval={monitor_s}", "--master_addr=127.0.0.1", f"--master_port={port}",
                           str(WRAPPER), str(SCRIPT),
                           "--out", str(out), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def rank_exit_codes(res):
    """{rank: exit status} as torchrun's failure report lists them ("rank : 1 (local_rank: 1)", "exitcode : 2")."""
    return dict((int(r), int(c)) for r, c in re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)",
                                                        res.stderr))


@pytest.mark.slow
@needs_mnist
def test_two_ranks_give_the_table_of_one_process_and_write_once(tmp_path):
    one = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--out", str(tmp_path / "one")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(tmp_path / "two", *ARGS)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "wrote" not in two.stderr, two.stderr[-3000:]          # rank 1 wrote nothing under --out
    assert two.stdout.count("test mse") == one.stdout.count("test mse") == 3   # rank 0 alone prints
    assert two.stdout.count("# E2, MNIST topk") == 1

    # one set of files, the same as one process writes (no second copy, no temporary leftovers)
    assert files(tmp_path / "two") == files(tmp_path / "one")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(json.loads((tmp_path / "one" / "manifest.json").read_text())["files"])

    rows1 = json.loads((tmp_path / "one" / "topk" / "table.json").read_text())
    rows2 = json.loads((tmp_path / "two" / "topk" / "table.json").read_text())
    assert [r["method"] for r in rows2] == [r["method"] for r in rows1]
    for a, b in zip(rows1, rows2):
        for key in ("n_train", "epochs", "samples_seen", "l0"):
            assert a[key] == b[key], (a["method"], key)
        # the model trains in float32 and the ranks' gradients are summed in another order than one process
        # sums them: each step's gradient differs by float32 rounding (~1e-7 relative), which 2 epochs of Adam
        # carry into the MSEs (measured here: 1e-9 to 1e-8 relative; the float64 statistics and evaluation
        # sums add less). 1e-6 leaves a factor 100 and is far below any difference between methods or
        # settings (percents). An ill-conditioned decoder solve amplifies rounding much more (a PAM run on 40
        # samples with 32 latents, E2 --quick's fraction 0.1: 3.5e-4), hence this run on 400 samples
        for key in ("train_mse", "test_mse", "test_fvu"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["method"], key)

    # a second invocation resumes: rank 0 reads the finished runs and sends them to rank 1
    again = torchrun(tmp_path / "two", *ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "wrote" not in again.stderr, again.stderr[-3000:]
    assert again.stdout.count("resuming: 3 runs finished earlier") == 1 and "test mse" not in again.stdout
    assert json.loads((tmp_path / "two" / "topk" / "table.json").read_text()) == rows2


def test_a_bad_setting_exits_2_on_every_rank_reported_once(tmp_path):
    res = torchrun(tmp_path / "out", "--K=999", monitor_s=5)   # both ranks exit before torchrun looks
    assert rank_exit_codes(res) == {0: 2, 1: 2}, res.stderr[-3000:]
    assert res.stderr.count("--K=999: expected an integer in [1, --N_LATENTS (= 256)]") == 1, res.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_busy_output_folder_exits_2_on_every_rank_reported_once(tmp_path):
    with lock_output(tmp_path):   # another run holds the folder
        res = torchrun(tmp_path, "--quick", monitor_s=5)
    assert rank_exit_codes(res) == {0: 2, 1: 2}, res.stderr[-3000:]
    assert res.stderr.count("the folder is in use by another run") == 1, res.stderr[-3000:]
    assert files(tmp_path) == [".lock"]
