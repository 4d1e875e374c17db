"""One rank of the distributed tests (tests/test_distributed.py), started by torchrun:

    torchrun --nproc_per_node=2 tests/dist_worker.py MODE OUT

MODE: pam | sgd (train the test's model on the test's data; rank 0 saves the model and history to OUT),
pam_stream | sgd_stream (the same, the data streamed from the folders of shards in $SPLINTERP_STREAM_DIR), or
die (rank 1 leaves at once; rank 0 must fail with a clear error instead of waiting forever)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.infra import distributed as dist  # noqa: E402
from common.infra.stream import Stream  # noqa: E402
from common.maths.sae import SAE  # noqa: E402
from common.maths.train import TrainConfig, train  # noqa: E402


def problem(method):
    """The data, model and settings the test also trains in one process (float64: differences are rounding)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(301, 6, generator=g).clamp(min=0) @ torch.randn(6, 9, generator=g)).double()
    model = SAE(9, 16, "topk", 3, seed=1, init="transpose_unit").double()
    cfg = TrainConfig(method=method, epochs=2, batch_size=40, lr=1e-2, aux_k=4, dead_after=80, b_dec_init="mean",
                      centre_input=True, keep_dead_atoms=True)
    return x[:251], x[251:], model, cfg


def main(mode, out):
    torch.set_num_threads(1)
    dist.init(backend="gloo")
    if mode == "die":
        if dist.rank() == 1:
            os._exit(0)
        mode = "pam"
    x_train, x_test, model, cfg = problem(mode.removesuffix("_stream"))
    if mode.endswith("_stream"):  # the same rows from folders of shards (tests/test_stream.py wrote them)
        folder = Path(os.environ["SPLINTERP_STREAM_DIR"])
        x_train, x_test = Stream.open(folder / "train", buffer_rows=70), Stream.open(folder / "test")
    hist = train(model, x_train, x_test, cfg, seed=2, progress=False)
    if dist.is_main():
        torch.save({"state": model.state_dict(), "history": hist, "world": dist.world()}, out)
    dist.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without running C++ static destructors: with gloo, torch 2.13 sometimes aborts at interpreter exit
    # ("terminate called without an active exception") after the group is destroyed; the results are written
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
