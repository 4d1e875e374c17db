# Two commands: `make claims` (check every claim of the paper) and `make test` (the test suite).
# Both create .venv, install requirements.txt under constraints.txt and fetch MNIST when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip install --quiet --constraint constraints.txt
STAMP  := $(VENV)/.installed
MNIST  := data/mnist/.verified
export MPLBACKEND := Agg
export VTK_DEFAULT_OPENGL_WINDOW := vtkEGLRenderWindow

.PHONY: venv data test test-all quick bench bench-e3 peers bench-peers claims claims-full clean

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

$(MNIST): $(STAMP)
	$(PY) -m common.infra.data mnist

data: $(MNIST)

test: $(STAMP) $(MNIST)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) $(MNIST)
	$(PY) -m pytest -q

quick: $(STAMP) $(MNIST)
	@set -e; for s in exp_*.py fig_*.py check_claims.py; do \
		[ -e "$$s" ] || continue; echo "== $$s --quick"; $(PY) $$s --quick; done

# the main job: every claim of the paper, with an honest verdict -> results/CLAIMS.md, results/claims.json
claims: $(STAMP) $(MNIST)
	$(PY) check_claims.py

claims-full: $(STAMP) $(MNIST)
	$(PY) check_claims.py --full

bench: $(STAMP) $(MNIST)
	$(PY) bench/bench_train.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_solve.py
	$(PY) bench/bench_stats_dtype.py

# per-epoch E3 costs and the projected full-protocol time (extracts the LLM activations first if not cached)
bench-e3: $(STAMP)
	$(PY) bench/bench_e3_protocol.py

# Peer SAE libraries (SAELens, EleutherAI sparsify) in their own venv, so .venv (what `make test` uses) stays
# as it is; torch stays 2.13.0 through constraints.txt (checked after the install).
PEERS_VENV  := .venv-peers
PEERS_PY    := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): requirements.txt requirements-peers.txt constraints.txt
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --constraint constraints.txt -r requirements.txt -r requirements-peers.txt
	$(PEERS_PY) -c "import torch; v = torch.__version__; assert v.split('+')[0] == '2.13.0', f'torch {v}, not 2.13.0'"
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

# our trainers next to SAELens and sparsify on MNIST, one table (20 epochs: ~8 min); fetches MNIST if missing
bench-peers: $(PEERS_STAMP)
	test -e $(MNIST) || $(PEERS_PY) -m common.infra.data mnist
	$(PEERS_PY) bench/bench_peers.py

clean:
	rm -rf results .pytest_cache
