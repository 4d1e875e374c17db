"""Devices: names are validated; training follows the model's device; GPU tests run only where CUDA is."""
import pytest
import torch

from common.maths.sae import SAE
from common.maths.train import TrainConfig, resolve_device, train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def toy(n=500, n_features=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g).clamp(min=0) @ torch.randn(6, n_features, generator=g)
    return x[:400], x[400:]


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'; accepted: auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="mps has none"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here"):
            resolve_device("cuda:0")


def test_cpu_data_for_a_model_elsewhere_is_moved_not_refused():
    xtr, xte = toy()
    model = SAE(10, 16, "topk", 3, seed=1)
    hist = train(model, xtr.double().float(), xte, TrainConfig(method="pam", epochs=1, batch_size=32), progress=False)
    assert hist[-1]["test_mse"] < hist[0]["test_mse"]


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("method", ["sgd", "pam"])
@pytest.mark.parametrize("recipe", [{}, dict(b_dec_init="mean", centre_input=True, aux_k=8, keep_dead_atoms=True,
                                             lr_schedule="warmup_decay")])
def test_cuda_training_matches_the_cpu(method, recipe):
    xtr, xte = toy()
    hists = {}
    for device in ("cpu", "cuda"):
        model = SAE(10, 16, "topk", 3, seed=1).to(device)
        cfg = TrainConfig(method=method, epochs=3, batch_size=32, lr=1e-2, **recipe)
        hists[device] = train(model, xtr, xte, cfg, seed=2, progress=False)
        assert model.W_enc.device.type == device
    for a, b in zip(hists["cpu"], hists["cuda"]):
        assert a["test_mse"] == pytest.approx(b["test_mse"], rel=1e-3)
