"""E1 in 8-D: is the exact Top-K SAE's error between k-means' and k-means + local PCA's, with the regions matched?

The 2-D scripts cannot fail the claim: at K >= 2 a rank-K local PCA is exact in the plane (lower bound 0), and
their softmax-relaxed models are not the Top-K SAE of the theory. Here, for each K in KS (all below DIM) and each
data seed: Gaussian mixture data in R^DIM with anisotropic, full-rank components (so rank-K local PCA leaves an
error), an exact Top-K SAE trained as such (full-batch Adam on the exact Top-K MSE, then its decoder solved exactly
for its codes), and k-means with as many clusters as the SAE has non-empty Top-K regions on the data:

    upper  k-means MSE                            (piecewise constant on R regions)
    value  the exact Top-K SAE's MSE              (piecewise affine of rank <= K on its R regions, shared atoms)
    lower  k-means + rank-K local PCA MSE          (piecewise affine of rank K on the k-means regions)

A case holds if lower <= value <= upper (common.experiments.claims.between_verdict); the claim holds if every case does and
every lower bound is above 1e-6 (common.experiments.e1_8d.between_8d_summary; docs/DESIGN.md, section 2.5).

    python exp_e1_between_kmeans_and_pca_8d.py [--quick] [--out DIR] [--seed N] [--NAME=value ...]
"""
import sys

from common.experiments import e1_8d
from common.experiments.config import above, at_least, configure, each, in_range, satisfies

N_POINTS = 500            # points per data set
DIM = 8                   # data dimension: every K below it
N_COMPONENTS = 4          # Gaussian mixture components (equal weights)
SEPARATION = 3.0          # component means ~ SEPARATION N(0, I)
DECAY = 0.6               # standard deviations 1, DECAY, DECAY^2, ... along a random rotation of each component
DATA_SEEDS = (0, 1, 2, 3, 4)
KS = (1, 2, 3)
N_LATENTS = 8             # the SAE's latents (the same for every K); its regions set k-means' number of clusters
STEPS = 2000              # full-batch Adam steps on the exact Top-K MSE
LR = 1e-2
SEED = 0                  # base seed of the SAE initialisations and k-means (run.seed_for)

ACCEPT = {  # what each constant accepts: checked by configure() before any work (common/experiments/config.py)
    "N_POINTS": at_least("N_COMPONENTS") & at_least("N_LATENTS"),
    "DIM": at_least(2),
    "N_COMPONENTS": at_least(1),
    "SEPARATION": at_least(0),
    "DECAY": in_range(0, 1, lo_open=True, hi_open=True),
    "DATA_SEEDS": each(at_least(0)),
    "KS": each(in_range(1, "N_LATENTS") & satisfies(lambda k, c: k < c["DIM"], "below --DIM (= {DIM})")),
    "N_LATENTS": at_least(1),
    "STEPS": at_least(1),
    "LR": above(0),
    "SEED": at_least(0),
}

QUICK = dict(STEPS=150, DATA_SEEDS=(0, 1), N_POINTS=300)


def main(argv=None):
    run = configure(globals(), argv=argv, quick=QUICK)
    cases = []
    for k in KS:
        for data_seed in DATA_SEEDS:
            x, _ = e1_8d.gaussian_mixture(N_POINTS, DIM, N_COMPONENTS, SEPARATION, DECAY, seed=data_seed)
            model, training = e1_8d.train_exact_topk(x, N_LATENTS, k, STEPS, LR, seed=run.seed_for("sae", k, data_seed))
            case = {"data_seed": data_seed, **e1_8d.between_case(x, model, seed=run.seed_for("kmeans", k, data_seed)),
                    "sae_topk_before_decoder_solve": training["mse_adam"], "train_seconds": training["seconds"]}
            cases.append(case)
            print(f"[{run.name}] K={k} data seed {data_seed}: k-means ({case['n_kmeans_clusters']} clusters) MSE "
                  f"{case['kmeans']:.5g} | exact Top-{k} SAE ({case['n_sae_regions']} regions) MSE "
                  f"{case['sae_topk']:.5g} | k-means + rank-{k} local PCA MSE {case['kmeans_local_pca']:.5g}"
                  f" -> {case['verdict']}", flush=True)
    result = {"cases": cases}
    verdict, numbers = e1_8d.between_8d_summary(result)
    result["summary"] = {"verdict": verdict, **numbers}
    title = (f"E1 in {DIM}-D ({N_COMPONENTS}-component anisotropic Gaussian mixture, {N_POINTS} points, "
             f"{N_LATENTS} latents): exact Top-K SAE between k-means and k-means + rank-K local PCA, "
             f"same number of regions: {verdict} ({numbers['held']} cases)")
    e1_8d.plot_between_8d(run.path("between_8d.png"), cases, title, result)
    print(f"[{run.name}] between in {numbers['held']} cases (per K: {numbers['per_k']}); smallest lower bound "
          f"{numbers['min_lower']:.3g} (floor {numbers['lower_floor']:g}) -> {verdict}   -> {run.out}")
    run.finish()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
