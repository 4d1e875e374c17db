"""E1, K = 1: a Top-1 SAE between k-means and PCA on the 2-D toy data.

Three views of the same 100 points: k-means (3 clusters), a Top-1 SAE with 40 latents whose partition
is drawn from its exact power-diagram cells, and "k-means + local PCA"; plus local PCA (rank 1) on the
SAE's own regions, which can only be more accurate than the SAE (docs/DESIGN.md, section 2, item 5).
Original training: softmax relaxation of Top-1 (temperature 0.3) over unit-norm encoder rows and
atoms, Adam 3e-3, 5000 full-batch steps; we also report the exact Top-1 model with those parameters.

    python exp_e1_between_kmeans_and_pca_k_1.py [--quick] [--out DIR] [--seed N] [--NAME=value ...]
"""
import sys

from common.experiments import e1_2d
from common.experiments.config import configure

N_POINTS = 100            # E1 toy data (common.infra.data.toy_e1)
DATA_SEED = 0
N_CLUSTERS = 3            # k-means: k-means++, n_init 10
N_LATENTS = 40
K = 1
MODE = "softmax"          # softmax (relaxed Top-1, original) | softmax_topk | topk (exact, trains the encoder)
TEMPERATURE = 0.3
UNIT_NORM = True          # encoder rows and atoms normalised to unit length (original)
DEC_BIAS = False          # the original had no decoder bias
INIT = "randn"            # randn (original k_1) | data | kmeans (first rows = k-means centroids)
BIAS_INIT_SCALE = 1.0     # b_enc ~ N(0, 1): "larger bias for visible polytopes"
DEC_INIT_SCALE = 1.0
LR = 3e-3
STEPS = 5000
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
