"""E1, K = 3 (hard): an exact Top-3 SAE between k-means and PCA on the 2-D toy data.

As exp_e1_between_kmeans_and_pca_k_3.py, but trained with the exact TopK codes (the K largest
pre-activations, the rest 0), so the gradient reaches the encoder through the code values. The
original's hard variant gave each of the top 3 a fixed weight 1/3, so its encoder never trained.
Local PCA on the SAE's regions has rank min(3, 2) = 2, i.e. it is exact on 2-D data.

    python exp_e1_between_kmeans_and_pca_k_3hard.py [--quick] [--out DIR] [--seed N] [--NAME=value ...]
"""
import sys

from common.experiments import e1_2d
from common.experiments.config import configure

N_POINTS = 100            # E1 toy data (common.infra.data.toy_e1)
DATA_SEED = 0
N_CLUSTERS = 3            # k-means: k-means++, n_init 10
N_LATENTS = 80
K = 3
MODE = "topk"             # exact TopK codes; softmax / softmax_topk are the relaxations (need TEMPERATURE)
UNIT_NORM = True          # encoder rows and atoms normalised to unit length (original)
DEC_BIAS = False          # the original had no decoder bias
INIT = "data"             # randn | data (rows = data points + noise, original) | kmeans
BIAS_INIT_SCALE = 1.0     # b_enc ~ N(0, 1): "larger bias for visible polytopes"
DEC_INIT_SCALE = 1.0
LR = 8e-3
STEPS = 7500
SNAPSHOT_FRACTIONS = (0.0, 0.02, 0.1, 0.3, 1.0)
BOX = (-2.0, 2.0, -2.0, 2.0)
GRID_RES = 400
SEED = 0

ACCEPT = e1_2d.ACCEPT_EXACT  # what each constant accepts (common/experiments/e1_2d.py; MODE: topk only, there is no
                          # TEMPERATURE): checked by configure() before any work

QUICK = dict(STEPS=60, GRID_RES=60)


def main(argv=None):
    run = configure(globals(), argv=argv, quick=QUICK)
    numbers = e1_2d.run_e1(run, e1_2d.E1Settings.from_constants(run.values))
    run.finish()
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
