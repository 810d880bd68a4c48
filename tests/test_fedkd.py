"""FedKD: the SVD compression law (rank grows with the threshold, energy bound,
smaller than dense), the threshold schedule, the distinct hidden losses, the
option checks, traffic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.fedkd import compress, decompress, energy_rank, threshold_at
from htfl_plugins.engine import payload_size, run
from htfl_plugins.engine.loop import prepare
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import parties


@pytest.fixture
def setup(digits_config):
    def make(**options):
        s, clients, server = parties(digits_config(algo="fedkd", options=options))
        return s, clients, server
    return make


def decaying_matrix(m=60, n=40, seed=0):
    """A matrix with singular values 1, 0.9, 0.81, ... (energy spread over many ranks)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(n, dtype=torch.float64)
    return (u * s) @ v.T, s


def expected_bytes(params: dict, threshold: float) -> int:
    """The compression law, written independently with numpy."""
    total = 0
    for p in params.values():
        a = p.detach().cpu().double().numpy()
        if a.ndim >= 2 and min(a.shape[0], a[0].size) > 1:
            w = a.reshape(a.shape[0], -1)
            m, n = w.shape
            e = np.linalg.svd(w, compute_uv=False) ** 2
            r = 1
            while e[:r].sum() < threshold * e.sum() and r < len(e):
                r += 1
            total += 4 * r * (m + n + 1) if r * (m + n + 1) < m * n else 4 * m * n
        else:
            total += 4 * a.size
    return total


def test_rank_grows_with_threshold_and_meets_the_energy():
    _, s = decaying_matrix()
    ranks = [energy_rank(s, t) for t in (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1] <= len(s)
    e = s ** 2
    for t, r in zip((0.5, 0.8, 0.9, 0.95, 0.98), ranks):
        assert e[:r].sum() >= t * e.sum()            # enough energy kept ...
        assert e[:r - 1].sum() < t * e.sum()         # ... with the smallest such rank


def test_compression_keeps_energy_bound_and_is_smaller_than_dense():
    w, s = decaying_matrix()
    conv = w[:, :36].reshape(60, 4, 3, 3).float()   # a conv weight: reshaped to 60 × 36
    params = {"fc.weight": w.float(), "fc.bias": torch.randn(60), "conv.weight": conv}
    dense = 4 * sum(p.numel() for p in params.values())
    previous = 0
    for t in (0.8, 0.9, 0.95, 0.98):
        payload = compress(params, t, prefix="m.")
        assert "m.fc.bias" in payload and "m.fc.weight.U" in payload
        assert payload["m.fc.weight.U"].shape[1] == energy_rank(s, t)
        _, nbytes = payload_size(payload)
        assert nbytes == expected_bytes(params, t)
        assert nbytes < dense
        assert nbytes >= previous                     # a higher threshold never sends less
        previous = nbytes
        back = decompress(payload, {k: v.shape for k, v in params.items()}, prefix="m.")
        assert torch.equal(back["fc.bias"], params["fc.bias"])
        for k in ("fc.weight", "conv.weight"):
            err = (back[k].double() - params[k].double()).pow(2).sum()
            assert err <= (1 - t) * params[k].double().pow(2).sum() * (1 + 1e-4)
            assert back[k].shape == params[k].shape


def test_full_rank_matrix_goes_dense():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g)        # flat spectrum: factors would be larger
    payload = compress({"w": w}, 0.98, prefix="")
    assert list(payload) == ["w"] and torch.equal(payload["w"], w)


def test_threshold_rises_linearly(setup):
    s, _, _ = setup()
    o = s.options
    assert threshold_at(o, 1, 5) == pytest.approx(0.95)
    assert threshold_at(o, 3, 5) == pytest.approx(0.965)
    assert threshold_at(o, 5, 5) == pytest.approx(0.98)
    assert threshold_at(o, 1, 1) == pytest.approx(0.95)


def test_hidden_losses_are_distinct(setup):
    _, clients, _ = setup()
    cl = clients[1]
    x, y = cl.data.x_train[:20], cl.data.y_train[:20]
    parts = cl.losses(x, y)
    assert parts["hid_t"].item() == pytest.approx(parts["hid_s"].item(), rel=1e-5)  # same value
    modules = {"mentor": cl.model, "mentee": cl.mentee, "w_h": cl.w_h}

    def grads(term):
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        cl.losses(x, y)[term].backward()
        return {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
                for k, m in modules.items()}

    assert grads("hid_t") == {"mentor": True, "mentee": False, "w_h": False}
    assert grads("hid_s") == {"mentor": False, "mentee": True, "w_h": True}
    assert grads("kd_t") == {"mentor": True, "mentee": False, "w_h": False}
    assert grads("kd_s") == {"mentor": False, "mentee": True, "w_h": False}
    # the adaptive weight 1 / (CE_t + CE_s)
    h = cl.model.base(x)
    mse = F.mse_loss(h, cl.w_h(cl.mentee.base(x)))
    w = 1 / (parts["ce_t"] + parts["ce_s"])
    assert parts["hid_t"].item() == pytest.approx((w * mse).item(), rel=1e-5)


def test_receive_and_upload(setup):
    _, clients, server = setup()
    down = server.broadcast(1, [0, 1])
    assert down[0]["energy"].item() == pytest.approx(0.95)
    clients[1].receive(down[1])
    clients[0].receive(down[0])
    for (n, p), (_, q) in zip(clients[0].mentee.named_parameters(),
                              clients[1].mentee.named_parameters()):
        assert torch.equal(p, q), n
    up = clients[1].upload()
    params = dict(clients[1].mentee.named_parameters())
    assert payload_size(up)[1] == expected_bytes(params, 0.95)
    assert payload_size(up)[1] < 4 * sum(p.numel() for p in params.values())


def test_server_averages_reconstructions_uniformly(setup):
    _, clients, server = setup()
    ups = {c.cid: c.upload() for c in clients[:2]}
    shapes = {n: p.shape for n, p in server.params.items()}
    a, b = (decompress(u, shapes) for u in ups.values())
    server.update(1, ups)
    for n in shapes:
        assert torch.allclose(server.params[n], (a[n] + b[n]) / 2, atol=1e-6)


def test_option_checks(digits_config):
    with pytest.raises(HtflError, match="t-end"):
        prepare(digits_config(algo="fedkd", options={"t_start": 0.99, "t_end": 0.9}),
                get_plugins())
    with pytest.raises(HtflError, match="mentee-model"):
        prepare(digits_config(algo="fedkd", options={"mentee_model": "NoSuchNet"}), get_plugins())


def test_end_to_end_traffic(digits_config):
    # near-random weights have flat spectra: at 0.95 the factors would not be smaller
    # than the matrices and everything goes dense, so lower thresholds show compression
    cfg = digits_config(algo="fedkd", threads=1,
                        options={"mentee_model": "SmallCNN", "t_start": 0.5, "t_end": 0.7})
    s = prepare(cfg, get_plugins())
    res = read_run(run(cfg, quiet=True))
    assert len(res["round"]) == 3
    assert all(math.isfinite(v) for v in res["test_acc"])
    assert all(math.isfinite(v) for v in res["extra"]["acc_mentee"])
    init = dict(s.ctx.build_model("SmallCNN", seed_key=("fedkd-mentee", "SmallCNN"))
                .named_parameters())
    dense = 4 * sum(p.numel() for p in init.values())
    # row 0 sends round 1 the server's initial mentee at T_start (+ the 4-byte threshold);
    # row r holds the broadcast sent after it, for round r+1
    assert res["download_bytes"][0] == 4 * (expected_bytes(init, 0.5) + 4)
    assert res["upload_bytes"][0] == 0
    for r in (1, 2):
        assert 0 < res["upload_bytes"][r] < 4 * dense
        assert 0 < res["download_bytes"][r] < 4 * (dense + 4)
