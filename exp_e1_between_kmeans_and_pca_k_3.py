"""E1, K = 3 (soft): a Top-3 SAE between k-means and PCA on the 2-D toy data.

Three views of the same 100 points: k-means (3 clusters), a Top-3 SAE with 80 latents whose partition
is drawn from its exact order-3 power-diagram cells (one colour per active set), and "k-means + local
PCA"; plus local PCA on the SAE's own regions (rank min(3, 2) = 2: exact in 2-D), which can only be
more accurate than the SAE (docs/DESIGN.md, section 2, item 5).
Original training: encoder rows initialised at data points, codes = softmax (temperature 0.3) over the
top 3 pre-activations, unit-norm rows and atoms, Adam 8e-3, 7500 full-batch steps; we also report the
exact Top-3 model (codes = pre-activations) with the same parameters.

    python exp_e1_between_kmeans_and_pca_k_3.py [--quick] [--out DIR] [--seed N] [--NAME=value ...]
"""
import sys

from common.experiments import e1_2d
from common.experiments.config import configure

N_POINTS = 100            # E1 toy data (common.infra.data.toy_e1)
DATA_SEED = 0
N_CLUSTERS = 3            # k-means: k-means++, n_init 10
N_LATENTS = 80
K = 3
MODE = "softmax_topk"     # softmax | softmax_topk (softmax over the top K, original) | topk (exact)
TEMPERATURE = 0.3
UNIT_NORM = True          # encoder rows and atoms normalised to unit length (original)
DEC_BIAS = False          # the original had no decoder bias
INIT = "data"             # randn | data (rows = data points + noise, original k_3) | kmeans
BIAS_INIT_SCALE = 1.0     # b_enc ~ N(0, 1): "larger bias for visible polytopes"
DEC_INIT_SCALE = 1.0
LR = 8e-3
STEPS = 7500
SNAPSHOT_FRACTIONS = (0.0, 0.02, 0.1, 0.3, 1.0)
BOX = (-2.0, 2.0, -2.0, 2.0)
GRID_RES = 400
SEED = 0

ACCEPT = e1_2d.ACCEPT  # what each constant accepts (common/experiments/e1_2d.py): checked by configure() first

QUICK = dict(STEPS=60, GRID_RES=60)


def main(argv=None):
    run = configure(globals(), argv=argv, quick=QUICK)
    numbers = e1_2d.run_e1(run, e1_2d.E1Settings.from_constants(run.values))
    run.finish()
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
