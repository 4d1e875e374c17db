"""E1, K = 3 (hard): an exact Top-3 SAE between k-means and PCA on the 2-D toy data.

As exp_e1_between_kmeans_and_pca_k_3.py, but trained with the exact TopK codes (the K largest
pre-activations, the rest 0), so the gradient reaches the encoder through the code values. The
original's hard variant gave each of the top 3 a fixed weight 1/3, so its encoder never trained.
Local PCA on the SAE's regions has rank min(3, 2) = 2, i.e. it is exact on 2-D data.

    python exp_e1_between_kmeans_and_pca_k_3hard.py [--quick] [--out DIR] [--seed N] [--NAME=value ...]
"""
import sys

from common import e1
from common.config import above, at_least, boolean, box, configure, each, in_range, one_of, satisfies

N_POINTS = 100            # E1 toy data (common.data.toy_e1)
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

ACCEPT = {  # what each constant accepts: checked by configure() before any work (common/config.py)
    "N_POINTS": at_least("N_CLUSTERS"),
    "DATA_SEED": at_least(0),
    "N_CLUSTERS": at_least(1),
    "N_LATENTS": at_least(1) & satisfies(lambda n, c: c["INIT"] != "kmeans" or n >= c["N_CLUSTERS"],
                                         "at least --N_CLUSTERS (= {N_CLUSTERS}) with --INIT=kmeans"),
    "K": in_range(1, "N_LATENTS"),
    "MODE": satisfies(lambda m, c: m == "topk", "topk (softmax and softmax_topk need a TEMPERATURE: "
                                                "exp_e1_between_kmeans_and_pca_k_3.py)"),
    "UNIT_NORM": boolean(),
    "DEC_BIAS": boolean(),
    "INIT": one_of(*e1.INITS),
    "BIAS_INIT_SCALE": at_least(0),
    "DEC_INIT_SCALE": above(0),
    "LR": above(0),
    "STEPS": at_least(1),
    "SNAPSHOT_FRACTIONS": each(in_range(0, 1)),
    "BOX": box("x", "y"),
    "GRID_RES": at_least(2),
    "SEED": at_least(0),
}

QUICK = dict(STEPS=60, GRID_RES=60)


def main(argv=None):
    run = configure(globals(), argv=argv, quick=QUICK)
    numbers = e1.run_e1(run, run.values)
    run.finish()
    return numbers


if __name__ == "__main__":
    main(sys.argv[1:])
