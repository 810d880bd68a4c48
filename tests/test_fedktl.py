"""FedKTL: ETF/ArcFace, generators with real weights, traffic formulas, server and
client mechanics, ablations, single-client mode."""

from __future__ import annotations

import hashlib
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedktl_plugin import generators as gens
from fedktl_plugin.etf import arcface_loss, cosine_logits, simplex_etf
from fedktl_plugin.fedktl import FedKTLOptions, mmd2, to_client_images
from htfl_plugins.config import build
from htfl_plugins.data import load_scenario
from htfl_plugins.engine import run
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins
from htfl_plugins.results import read_run
from tests.helpers import one_round, parties

FAST = {"server_epochs": 3, "save_images": 0}


# ------------------------------------------------------------------ ETF and ArcFace
@pytest.mark.parametrize("k", [2, 10, 200])
def test_simplex_etf_geometry(k):
    a = simplex_etf(k, seed=1).double()
    assert a.shape == (k, k)
    assert torch.allclose(a.norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6)
    gram = a @ a.t()
    off = gram[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-5)
    assert torch.equal(simplex_etf(k, 1), simplex_etf(k, 1))
    assert not torch.equal(simplex_etf(k, 1), simplex_etf(k, 2))


def test_arcface_adds_margin_to_true_class_only_and_never_nans():
    anchors = simplex_etf(5, 0)
    out = anchors[[0, 1, 2]].clone().requires_grad_(True)  # cos = 1 exactly for the true class
    y = torch.tensor([0, 1, 2])
    loss = arcface_loss(cosine_logits(out, anchors), y, s=64, m=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.grad).all()
    # value: CE on s·cos with the true cosine replaced by cos(θ+m)
    cos = cosine_logits(out.detach(), anchors)
    ref = cos.clone()
    ref[range(3), y] = torch.cos(torch.acos(cos[range(3), y].clamp(-1 + 1e-7, 1 - 1e-7)) + 0.5)
    assert torch.allclose(loss, F.cross_entropy(64 * ref, y), atol=1e-4)
    anti = (-anchors[[0]]).requires_grad_(True)  # cos = -1 for the true class
    loss = arcface_loss(cosine_logits(anti, anchors), torch.tensor([0]), 64, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(anti.grad).all()


@pytest.mark.parametrize("monotone", [True, False])
def test_arcface_pulls_a_sample_near_its_antipode_back_only_when_monotone(monotone):
    """Past θ > π − m, cos(θ + m) rises again: with the authors' target a sample
    near the antipode of its anchor lowers its loss by moving further away (a
    trap); the monotone target cos θ − m·sin m always rewards moving closer."""
    def loss_at(cos_true):  # the other classes' cosines held fixed
        cos = torch.full((1, 10), -1 / 9)
        cos[0, 0] = cos_true
        return arcface_loss(cos, torch.tensor([0]), 64, 0.5, monotone=monotone).item()

    assert math.acos(-0.95) > math.pi - 0.5  # both points are past π − m
    assert (loss_at(-0.95) < loss_at(-0.99)) == monotone
    assert (loss_at(-0.95) < loss_at(-0.9)) != monotone
    # before π − m both targets are cos(θ + m)
    assert loss_at(0.3) == pytest.approx(arcface_loss(
        torch.tensor([[0.3] + [-1 / 9] * 9]), torch.tensor([0]), 64, 0.5, monotone=not monotone).item())


def test_mmd_separates_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 20, generator=g), torch.randn(64, 20, generator=g)
    assert mmd2(a, b) < 0.1 * mmd2(a, b + 3.0)
    assert mmd2(a, a).abs() < 1e-5


# ------------------------------------------------------------------ generators, real weights
def test_default_generator_real_weights():
    path = gens.DCGANFace.weights()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == gens.DCGANFace.SHA256
    g = gens.DCGANFace("", torch.device("cpu"))
    z = g.sample_prior(4, torch.Generator().manual_seed(0))
    assert z.shape == (4, 100)
    img = g.synthesize(z)
    assert img.shape == (4, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert (img[0] - img[1]).abs().mean() > 0.02  # different latents, different faces
    assert img.std() > 0.1  # a trained generator, not a flat image


def test_omniart_generator_real_weights_without_importing_the_package():
    import sys

    g = gens.OmniArtEyes("", torch.device("cpu"))
    assert "omniart_eye_generator" not in sys.modules
    z = g.sample_prior(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 108) and torch.equal(z[:, 100:].sum(1), torch.ones(3))
    img = g.synthesize(z)
    assert img.shape == (3, 3, 128, 128) and 0 <= img.min() and img.max() <= 1 and img.std() > 0.05


def test_missing_or_corrupt_weights_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(gens.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HtflError, match=r"pip install --no-deps gan_face_generate==1\.1\.1"):
        gens.DCGANFace.check("")
    bad = tmp_path / "w.tar"
    bad.write_bytes(b"garbage")
    with pytest.raises(HtflError, match="cannot read generator weights"):
        gens.DCGANFace(str(bad), torch.device("cpu"))


def test_stylegan_adapter_uses_w_layer_zero_repeated(tmp_path):
    from tests.fake_stylegan import FakeG

    path = tmp_path / "net.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"G_ema": FakeG(c_dim=3)}, fh)
    g = gens.StyleGAN(str(path), torch.device("cpu"))
    assert g.latent_dim == 6 and g.image_size == 16
    w = g.sample_prior(5, torch.Generator().manual_seed(0))
    assert w.shape == (5, 6)
    assert g.g.last_c.shape == (5, 3) and torch.equal(g.g.last_c.sum(1), torch.ones(5))
    img = g.synthesize(w)
    assert img.shape == (5, 3, 16, 16) and 0 <= img.min() and img.max() <= 1
    ws = g.g.last_ws
    assert ws.shape == (5, 5, 6) and torch.equal(ws[:, 0], w) and torch.equal(ws[:, 4], w)
    with pytest.raises(HtflError, match="not a StyleGAN network pickle"):
        bad = tmp_path / "bad.pkl"
        bad.write_bytes(pickle.dumps({"D": 1}))
        gens.StyleGAN(str(bad), torch.device("cpu"))


def _tiny_stable_diffusion(folder):
    """A randomly initialised, tiny Stable Diffusion pipeline saved in diffusers'
    folder layout (no download)."""
    import json

    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=100, max_position_embeddings=77))
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "tok").mkdir(parents=True)
    (folder / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                        pad_token="!", model_max_length=77)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def test_stable_diffusion_adapter_end_to_end_offline(tmp_path):
    pytest.importorskip("diffusers", reason="the diffusion extra is installed by `make test`")
    path = _tiny_stable_diffusion(tmp_path)
    opts = FedKTLOptions(generator="stable-diffusion", generator_path=str(path), sd_steps=2)
    gens.StableDiffusion.check(str(path))
    g = gens.StableDiffusion(str(path), torch.device("cpu"), opts)
    assert g.latent_dim == 4 * 8 * 8 and g.image_size == 16
    x_t = g.sample_prior(2, torch.Generator().manual_seed(0))
    a = g.synthesize(x_t)
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(g.synthesize(x_t), a, atol=1e-5)  # x_T decides the image
    assert not torch.allclose(g.synthesize(x_t.flip(0)), a, atol=1e-3)


def test_client_image_mapping():
    img = torch.rand(3, 3, 64, 64)
    grey = to_client_images(img, (1, 28, 28))
    assert grey.shape == (3, 1, 28, 28) and grey.min() >= -1 and grey.max() <= 1
    same = to_client_images(img, (3, 64, 64))
    assert torch.allclose(same, img * 2 - 1)


# ------------------------------------------------------------------ the algorithm in the loop
def _label_sets(cfg):
    return [c.labels() for c in load_scenario(cfg, get_plugins()).clients]


def test_traffic_equals_the_formulas(digits_config):
    cfg = digits_config(algo="fedktl", rounds=3, options=FAST)
    r = read_run(run(cfg, quiet=True))
    k, latent, pixels = 10, 100, 1 * 8 * 8
    up = sum(len(s) * (k * 4 + 8) for s in _label_sets(cfg))
    assert list(r["upload_bytes"]) == [0, up, up, up]
    per_client = k * (pixels + latent) * 4
    # row r holds the broadcast sent after it, for round r+1
    assert r["client_download_bytes"][0].tolist() == [0] * 4  # nothing generated yet
    for row in (1, 2, 3):
        assert r["client_download_bytes"][row].tolist() == [per_client] * 4


def _setup(digits_config, **opts):
    return parties(digits_config(algo="fedktl", options={**FAST, **opts}))


def _round(server, clients, r):
    return one_round(clients, server, r)[1]


def test_server_aligns_persistently_and_sends_every_class(digits_config):
    s, clients, server = _setup(digits_config, centroid_stats="eval")
    f_obj, c_obj = server.transformer, server.centroids
    uploads = _round(server, clients, 1)
    # prototypes: one unit vector of K entries per local class
    for c, up in zip(clients, uploads.values()):
        assert up["labels"].tolist() == c.data.labels()
        assert up["protos"].shape == (len(c.data.labels()), 10)
        assert torch.allclose(up["protos"].norm(dim=1), torch.ones(len(up["labels"])), atol=1e-5)
    # centroids = eval-mode class means of F(P) after training
    protos = torch.cat([u["protos"] for u in uploads.values()])
    labels = torch.cat([u["labels"] for u in uploads.values()])
    server.transformer.eval()
    with torch.no_grad():
        q = server.transformer(protos)
    for c in torch.unique(labels):
        assert torch.allclose(server.centroids.weight[c], q[labels == c].mean(0), atol=1e-5)
    pairs = server.broadcast(2, [0, 1, 2, 3])
    assert set(pairs) == {0, 1, 2, 3}
    assert pairs[0]["images"].shape == (10, 1, 8, 8) and pairs[0]["latents"].shape == (10, 100)
    assert torch.equal(pairs[0]["latents"], server.centroids.weight.detach())
    before = [p.detach().clone() for p in server.transformer.parameters()]
    _round(server, clients, 2)
    assert server.transformer is f_obj and server.centroids is c_obj
    assert any(not torch.equal(a, b) for a, b in zip(before, server.transformer.parameters()))


def test_latent_loss_reaches_base_and_projection_not_head(digits_config):
    s, clients, server = _setup(digits_config)
    _round(server, clients, 1)
    c = clients[0]
    c.receive(server.broadcast(2, [0])[0])
    c.model.zero_grad()
    xg, vg = c._next_pairs()
    F.mse_loss(c.proj(c.model.base(xg)), vg).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in c.model.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in c.model.base.parameters())
    assert c.proj.weight.grad.abs().sum() > 0


def _grads_of_step(c, x, y, one_pass):
    c.model.zero_grad()
    c.proj.zero_grad()
    c._pair_order = torch.arange(len(c.pairs[0]))
    c._one_pass = one_pass
    loss = c._step_loss(x, y, transfer=True)
    loss.backward()
    params = list(c.model.parameters()) + list(c.proj.parameters())
    return loss.detach(), [p.grad.clone() for p in params]


def test_one_pass_over_real_and_generated_images_is_the_two_pass_step(digits_config):
    s, clients, server = parties(digits_config(algo="fedktl", models="FedAvgCNN,SmallCNN,MLP,ResNet4",
                                               options=FAST))
    _round(server, clients, 1)
    for c in clients:
        c.receive(server.broadcast(2, [c.cid])[c.cid])
    assert [c._one_pass for c in clients] == [True, True, True, False]  # ResNet4 has BatchNorm
    for c in clients[:3]:
        x, y = c.data.x_train[:10], c.data.y_train[:10]
        loss1, g1 = _grads_of_step(c, x, y, one_pass=True)
        loss2, g2 = _grads_of_step(c, x, y, one_pass=False)
        assert torch.allclose(loss1, loss2, rtol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g2))


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_projection_head_modes(digits_config, mode):
    s, clients, server = _setup(digits_config, proj=mode)
    _round(server, clients, 1)
    _round(server, clients, 2)  # first round with pairs: trains h'
    trained = clients[0].proj.weight.detach().clone()
    clients[0].receive(server.broadcast(3, [0])[0])
    after = clients[0].proj.weight.detach()
    if mode == "keep":
        assert torch.equal(after, trained)
        assert not torch.equal(clients[0].proj.weight, clients[1].proj.weight)
    else:
        assert not torch.equal(after, trained)
        fresh = clients[1]
        fresh.receive(server.broadcast(3, [1])[1])
        assert torch.equal(after, fresh.proj.weight.detach())  # the shared initialisation


@pytest.mark.parametrize("opts", [
    {"mu": 0.0}, {"lamda": 0.0}, {"use_mmd": False}, {"use_etf": False},
    {"use_centroids": False}, {"latents": "prior"},
])
def test_ablation_switches(digits_config, opts):
    s, clients, server = _setup(digits_config, **opts)
    uploads = _round(server, clients, 1)
    pairs = server.pairs
    n_up = sum(len(u["labels"]) for u in uploads.values())
    if opts.get("use_centroids") is False:
        assert len(pairs["latents"]) == n_up  # one image per uploaded prototype
    else:
        assert len(pairs["latents"]) == 10
    if opts.get("latents") == "prior":
        assert not torch.allclose(pairs["latents"], server.centroids.weight.detach())
    _round(server, clients, 2)
    if opts.get("mu") == 0.0:
        assert clients[0].proj is None and server.broadcast(3, [0]) == {}  # no L^M, no download
    if opts.get("use_etf") is False:
        x = clients[0].data.x_test[:4]
        assert torch.equal(clients[0].scores(x), clients[0].model(x))


def test_image_grid_saved_and_single_client_mode(digits_config, tmp_path):
    cfg = digits_config(algo="fedktl", clients=1, partition="iid", few_shot=2, rounds=2,
                        options={"server_epochs": 3, "save_images": 1}, name="single")
    r = read_run(run(cfg, quiet=True))
    assert np.isfinite(r["test_acc"]).all()
    grids = sorted((tmp_path / "results" / "single_images").glob("round_*.png"))
    assert [g.name for g in grids] == ["round_0001.png", "round_0002.png"]
    from PIL import Image

    with Image.open(grids[0]) as im:
        assert im.size[0] > 10 * 64  # ten 64-pixel faces in a row
    sc = load_scenario(cfg, get_plugins())
    assert np.bincount(sc.clients[0].y_train.numpy()).max() <= 2


def test_options_are_typed_and_checked():
    from htfl_plugins.config import RunConfig

    with pytest.raises(HtflError, match="--proj must be one of keep, reset"):
        build(FedKTLOptions, {"proj": "sometimes"}, "option(s)")
    assert build(RunConfig, {"algo": "fedktl"}, "s").dataset == "fmnist"


def test_batch_stat_centroids_use_the_statistics_mmd_aligned(digits_config):
    from fedktl_plugin.fedktl import FeatureTransformer

    f = FeatureTransformer(10, 6)
    p = torch.randn(8, 10)
    bn = f.net[1]
    before = (bn.running_mean.clone(), bn.running_var.clone())
    f.eval()
    batch = f.forward_batch_stats(p)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    f.train()
    assert torch.allclose(batch, f(p), atol=1e-6)  # = train-mode output
    s, clients, server = _setup(digits_config, centroid_stats="batch")
    uploads = _round(server, clients, 1)
    protos = torch.cat([u["protos"] for u in uploads.values()])
    labels = torch.cat([u["labels"] for u in uploads.values()])
    with torch.no_grad():
        q = server.transformer.forward_batch_stats(protos)
    for c in torch.unique(labels):
        assert torch.allclose(server.centroids.weight[c], q[labels == c].mean(0), atol=1e-5)


@pytest.mark.parametrize("stats", ["batch", "eval"])
def test_the_no_centroid_ablation_follows_centroid_stats(digits_config, stats):
    _, clients, server = _setup(digits_config, use_centroids=False, centroid_stats=stats)
    uploads = _round(server, clients, 1)
    protos = torch.cat([u["protos"] for u in uploads.values()])
    with torch.no_grad():
        server.transformer.eval()
        batch, running = server.transformer.forward_batch_stats(protos), server.transformer(protos)
    assert not torch.allclose(batch, running, atol=1e-4)
    assert torch.allclose(server.pairs["latents"], batch if stats == "batch" else running, atol=1e-6)


def test_generated_pairs_never_come_in_a_batch_of_one(digits_config):
    _, clients, _ = _setup(digits_config, mu=1.0)
    client = clients[0]
    client.cfg = type(client.cfg)(**{**vars(client.cfg), "batch_size": 3})
    client.pairs = (torch.zeros(10, 1, 8, 8), torch.zeros(10, 4))  # K = 10 classes, 10 mod 3 = 1
    sizes = [len(client._next_pairs()[0]) for _ in range(9)]
    assert sizes == [3, 3, 4] * 3 and sum(sizes[:3]) == 10  # each pass covers every pair once


@pytest.mark.parametrize("eval_point", ["after-broadcast", "after-update"])
@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_client_failing_in_its_first_round_with_pairs_is_left_out_not_fatal(digits_config, monkeypatch,
                                                                              eval_point, how):
    from fedktl_plugin.fedktl import FedKTLClient

    original = FedKTLClient._step_loss

    def step(self, x, y, transfer):
        if transfer and self.cid == 1:  # from round 2 on, once image–latent pairs have arrived
            if how == "raise":
                raise RuntimeError("out of luck")
            return original(self, x, y, transfer) * float("nan")
        return original(self, x, y, transfer)

    monkeypatch.setattr(FedKTLClient, "_step_loss", step)
    r = read_run(run(digits_config(algo="fedktl", options=FAST, rounds=3, eval_point=eval_point), quiet=True))
    assert r["attrs"]["status"] == "finished"
    assert list(r["failed_clients"]) == [0, 0, 1, 1]
    assert np.isnan(r["client_local_loss"][2:, 1]).all() and np.isfinite(r["client_local_loss"][1:, 0]).all()
