"""torch.distributed (gloo, 2 processes started by torchrun) gives the single-process result, and a rank that
dies makes the others fail with a clear message instead of hanging (three torchrun starts: ~25 s here, even with
another job running; part of `make test`)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import problem  # noqa: E402

from common.maths.train import train  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_worker.py"


def torchrun(mode, out, timeout=120):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, SPLINTERP_DIST_TIMEOUT="20", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), mode, str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("method, tol", [("pam", 1e-10), ("sgd", 1e-10)])
def test_two_ranks_train_what_one_process_trains(tmp_path, method, tol):
    res = torchrun(method, tmp_path / "rank0.pt")
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert got["world"] == 2
    x_train, x_test, model, cfg = problem(method)
    hist = train(model, x_train, x_test, cfg, seed=2, progress=False)
    for name, value in model.state_dict().items():
        assert torch.allclose(got["state"][name], value, rtol=0, atol=tol), name  # decoder, encoder, centre
    for a, b in zip(got["history"], hist):
        for key in ("train_mse", "test_mse", "test_dead", "samples_seen", "grad_steps"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def test_a_rank_that_dies_makes_the_others_fail_clearly(tmp_path):
    res = torchrun("die", tmp_path / "rank0.pt", timeout=180)
    assert res.returncode != 0
    assert "a collective failed or timed out" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "rank0.pt").exists()
