"""Model zoo: every architecture on every input kind the data sources produce."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from htfl_plugins.models.zoo import GROUPS, MODELS, BaseHeadSplit, build_model
from htfl_plugins.plugins import get_plugins

KINDS = [(1, 8), (1, 28), (3, 32), (3, 64)]  # digits, (F)MNIST, CIFAR, Tiny/Flowers
ALL_KINDS = [(c, s) for c in (1, 3) for s in (8, 28, 32, 64)]
K, D = 10, 512

# Slow on a CPU: each is checked on the two input kinds that exercise its odd paths
# (upsizing for GoogLeNet/ViT, the smallest and largest maps for the rest).
BIG = {
    "ResNet50": [(1, 8), (3, 64)],
    "ResNet101": [(1, 28), (3, 32)],
    "ResNet152": [(1, 8), (3, 64)],
    "GoogLeNet": [(1, 8), (3, 64)],
    "MobileNetV2": [(1, 8), (3, 32)],
    "ViT-B/16": [(1, 28), (3, 64)],
    "ViT-B/32": [(1, 8), (3, 32)],
}
CHEAP = [name for name in MODELS if name not in BIG]




@pytest.fixture(scope="module")
def plugins():
    return get_plugins()


def check(plugins, arch, c, s, backward=True, batch=2):
    torch.manual_seed(0)
    model = build_model(plugins, arch, c, s, K, D)
    assert isinstance(model, BaseHeadSplit)
    model.train()
    x = torch.randn(batch, c, s, s)
    feats = model.base(x)
    assert feats.shape == (batch, D), (arch, c, s)
    out = model.head(feats)
    assert out.shape == (batch, K), (arch, c, s)
    assert torch.isfinite(out).all()
    if backward:
        nn.functional.cross_entropy(out, torch.arange(batch) % K).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), f"{arch}: a parameter got no gradient"
        assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        one = model(x[:1])  # a single sample works in eval mode (BatchNorm)
        assert one.shape == (1, K)
        assert torch.allclose(model.head(model.base(x[:1])), one)
    return model


def test_registry_matches_the_zoo(plugins):
    reg = plugins.registry("models")
    assert set(MODELS) <= set(reg.names())
    for name in MODELS:
        assert reg.get(name).obj is MODELS[name][0]
    # every registered model is covered by the tests below
    assert set(CHEAP) | set(BIG) == set(MODELS)


@pytest.mark.parametrize("kind", KINDS, ids=[f"{c}x{s}x{s}" for c, s in KINDS])
@pytest.mark.parametrize("arch", CHEAP)
def test_cheap_models_on_every_input_kind(plugins, arch, kind):
    check(plugins, arch, *kind)


@pytest.mark.parametrize("kind", [(3, 8), (1, 32), (1, 64), (3, 28)],
                         ids=["3x8x8", "1x32x32", "1x64x64", "3x28x28"])
@pytest.mark.parametrize("arch", ["FedAvgCNN", "SmallCNN", "MLP", "ResNet4", "ResNet10",
                                  "ResNet18"])
def test_cheap_models_on_other_channel_counts(plugins, arch, kind):
    check(plugins, arch, *kind, backward=False)


@pytest.mark.parametrize("arch,kind", [(a, k) for a, kinds in BIG.items() for k in kinds],
                         ids=[f"{a}-{c}x{s}" for a, kinds in BIG.items() for c, s in kinds])
def test_big_models(plugins, arch, kind):
    check(plugins, arch, *kind)


def test_heads(plugins):
    for arch in ("FedAvgCNN", "MLP", "ResNet4", "ResNet18"):
        head = build_model(plugins, arch, 1, 28, K, D).head
        assert isinstance(head, nn.Linear), arch
        assert (head.in_features, head.out_features) == (D, K)
    head = build_model(plugins, "ViT-B/32", 3, 32, K, D).head  # Linear → Tanh → Linear
    assert isinstance(head, nn.Sequential) and isinstance(head[1], nn.Tanh)
    assert head[0].in_features == D and head[-1].out_features == K


@pytest.mark.parametrize("dim", [64, 100, 1024])
def test_other_feature_widths(plugins, dim):
    for arch in ("FedAvgCNN", "ResNet4", "MLP"):
        model = build_model(plugins, arch, 1, 28, 7, dim)
        x = torch.randn(3, 1, 28, 28)
        assert model.base(x).shape == (3, dim) and model(x).shape == (3, 7)


def test_groups_list_only_registered_models(plugins):
    models = plugins.registry("models")
    groups = plugins.registry("groups")
    assert set(GROUPS) <= set(groups.names())
    for name in groups.names():
        archs = groups.get(name).obj
        assert archs, f"group {name} is empty"
        missing = [a for a in archs if a not in models]
        assert not missing, f"group {name} lists unregistered models {missing}"
    assert len(GROUPS["HtFE-img-8"][0]) == 8
    assert len(GROUPS["HtM-img-10"][0]) == 10


def test_build_model_rejects_a_wrong_builder(plugins, monkeypatch):
    reg = plugins.registry("models")
    item = reg.get("MLP")
    monkeypatch.setattr(item, "obj", lambda c, s, k, d: nn.Linear(2, 2))
    with pytest.raises(TypeError, match="BaseHeadSplit"):
        build_model(plugins, "MLP", 1, 8, K, D)
