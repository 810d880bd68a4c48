"""Architectures and HtFLlib's model groups, adapted to the input's channels and size.

``BaseHeadSplit`` holds a base (input → ``feature_dim`` features) and a head
(features → logits). As in HtFLlib, a backbone's own classifier is replaced by
an average pool to ``feature_dim`` so every client's features have the same
width, and every head is the same ``Linear(feature_dim, K)`` (ViTs get
Linear → Tanh → Linear, as in HtFLlib).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BaseHeadSplit(nn.Module):
    def __init__(self, base: nn.Module, head: nn.Module):
        super().__init__()
        self.base = base
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))


def mixes_samples(model: nn.Module) -> bool:
    """Whether a training-mode forward pass makes one sample's output depend on the
    others in its batch (BatchNorm and its kin do; convolutions, pooling and
    per-sample norms do not)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class PoolTo(nn.Module):
    """Flatten and average-pool (or repeat) the features to ``width`` entries."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] == self.width:
            return x
        return F.adaptive_avg_pool1d(x.unsqueeze(1), self.width).squeeze(1)


class Resize(nn.Module):
    """Resize inputs to ``size`` (for backbones that need a minimum or a fixed size)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def linear_head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes)


# ------------------------------------------------------------------ small CNNs / MLP
class FedAvgCNN(nn.Module):
    """conv5×5(32)–ReLU–pool → conv5×5(64)–ReLU–pool → FC(→512)–ReLU (the "4-layer CNN").
    Inputs smaller than 16 pixels use padded convolutions so the map survives."""

    def __init__(self, in_channels: int, image_size: int, hidden: int = 512):
        super().__init__()
        pad = 2 if image_size < 16 else 0
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten())
        with torch.no_grad():
            dim = self.conv(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc1 = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc1(self.conv(x))


class SmallCNN(nn.Module):
    """conv3×3(16)–ReLU–pool → conv3×3(32)–ReLU–pool → FC(→256)–ReLU: a cheap CPU model."""

    def __init__(self, in_channels: int, image_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten())
        with torch.no_grad():
            dim = self.net(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc(self.net(x))


class MLP(nn.Module):
    """Flatten → FC(→256)–ReLU → FC(→256)–ReLU."""

    def __init__(self, in_channels: int, image_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(),
                                 nn.Linear(in_channels * image_size * image_size, 256),
                                 nn.ReLU(inplace=True), nn.Linear(256, 256), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------ small ResNets
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class SmallResNet(nn.Module):
    """ResNet4/6/8/10: a 3×3 stem and 1–4 stages of one basic block (64·2^i channels)."""

    def __init__(self, in_channels: int, stages: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for i in range(stages):
            cout = 64 * 2 ** i
            layers.append(BasicBlock(cin, cout, 1 if i == 0 else 2))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.layers(self.stem(x))).flatten(1)


# ------------------------------------------------------------------ torchvision backbones
def _swap_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, bias=conv.bias is not None)


def _torchvision(name: str, in_channels: int, image_size: int, feature_dim: int) -> nn.Module:
    import torchvision.models as tvm

    if name.startswith("resnet"):
        m = getattr(tvm, name)(weights=None)
        m.conv1 = _swap_first_conv(m.conv1, in_channels)
        m.fc = PoolTo(feature_dim)
        return m
    if name == "googlenet":
        m = tvm.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False)
        m.conv1.conv = _swap_first_conv(m.conv1.conv, in_channels)
        m.fc = PoolTo(feature_dim)
        return nn.Sequential(Resize(max(image_size, 32)), m) if image_size < 32 else m
    if name == "mobilenet_v2":
        m = tvm.mobilenet_v2(weights=None)
        m.features[0][0] = _swap_first_conv(m.features[0][0], in_channels)
        m.classifier = PoolTo(feature_dim)
        return m
    if name.startswith("vit"):
        patch = 16 if name == "vit_b_16" else 32
        size = max(32, math.ceil(image_size / patch) * patch)
        m = getattr(tvm, name)(weights=None, image_size=size)
        m.conv_proj = _swap_first_conv(m.conv_proj, in_channels)
        m.heads = PoolTo(feature_dim)
        return nn.Sequential(Resize(size), m) if size != image_size else m
    raise ValueError(name)


def _pooled(module: nn.Module, feature_dim: int) -> nn.Module:
    return nn.Sequential(module, PoolTo(feature_dim))


def _simple(make):
    def builder(in_channels, image_size, num_classes, feature_dim):
        return BaseHeadSplit(_pooled(make(in_channels, image_size), feature_dim),
                             linear_head(feature_dim, num_classes))
    return builder


def _tv(name, vit=False):
    def builder(in_channels, image_size, num_classes, feature_dim):
        base = _torchvision(name, in_channels, image_size, feature_dim)
        if vit:
            head = nn.Sequential(nn.Linear(feature_dim, 768), nn.Tanh(), nn.Linear(768, num_classes))
        else:
            head = linear_head(feature_dim, num_classes)
        return BaseHeadSplit(base, head)
    return builder


MODELS = {
    "FedAvgCNN": (_simple(FedAvgCNN), "HtFLlib's 4-layer CNN (2 conv + 2 FC)"),
    "SmallCNN": (_simple(SmallCNN), "2 narrow 3×3 conv layers + FC(256): fast on a CPU"),
    "MLP": (_simple(MLP), "2-layer perceptron (256 units)"),
    "ResNet4": (_simple(lambda c, s: SmallResNet(c, 1)), "3×3 stem + 1 basic block (64 ch)"),
    "ResNet6": (_simple(lambda c, s: SmallResNet(c, 2)), "3×3 stem + 2 basic blocks (→128 ch)"),
    "ResNet8": (_simple(lambda c, s: SmallResNet(c, 3)), "3×3 stem + 3 basic blocks (→256 ch)"),
    "ResNet10": (_simple(lambda c, s: SmallResNet(c, 4)), "3×3 stem + 4 basic blocks (→512 ch)"),
    "ResNet18": (_tv("resnet18"), "torchvision ResNet-18, random init"),
    "ResNet34": (_tv("resnet34"), "torchvision ResNet-34, random init"),
    "ResNet50": (_tv("resnet50"), "torchvision ResNet-50, random init"),
    "ResNet101": (_tv("resnet101"), "torchvision ResNet-101, random init"),
    "ResNet152": (_tv("resnet152"), "torchvision ResNet-152, random init"),
    "GoogLeNet": (_tv("googlenet"), "torchvision GoogLeNet (no aux heads), random init"),
    "MobileNetV2": (_tv("mobilenet_v2"), "torchvision MobileNetV2, random init"),
    "ViT-B/16": (_tv("vit_b_16", vit=True), "torchvision ViT-B/16 (image size rounded up to the patch)"),
    "ViT-B/32": (_tv("vit_b_32", vit=True), "torchvision ViT-B/32 (image size rounded up to the patch)"),
}

_HTFE8 = ["FedAvgCNN", "GoogLeNet", "MobileNetV2", "ResNet18", "ResNet34", "ResNet50",
          "ResNet101", "ResNet152"]

GROUPS = {
    "HtFE-img-2": (["FedAvgCNN", "ResNet18"], "HtFLlib HtFE2"),
    "HtFE-img-3": (["ResNet10", "ResNet18", "ResNet34"], "HtFLlib HtFE3"),
    "HtFE-img-4": (["FedAvgCNN", "GoogLeNet", "MobileNetV2", "ResNet18"], "HtFLlib HtFE4"),
    "HtFE-img-5": (["GoogLeNet", "MobileNetV2", "ResNet18", "ResNet34", "ResNet50"], "HtFLlib HtFE5"),
    "HtFE-img-8": (_HTFE8, "HtFLlib HtFE8, the FedKTL paper's main group"),
    "HtFE-img-9": (["ResNet4", "ResNet6", "ResNet8", "ResNet10", "ResNet18", "ResNet34",
                    "ResNet50", "ResNet101", "ResNet152"], "HtFLlib HtFE9"),
    "HtM-img-10": (_HTFE8 + ["ViT-B/16", "ViT-B/32"], "HtFLlib HtM10 (HtFE8 + two ViTs)"),
    "HtFE-cpu-3": (["FedAvgCNN", "SmallCNN", "MLP"], "three fast CPU models (CNN, narrow CNN, MLP)"),
    "HtFE-cpu-4": (["FedAvgCNN", "SmallCNN", "MLP", "ResNet4"], "HtFE-cpu-3 plus ResNet4"),
}


def build_model(plugins, arch: str, in_channels: int, image_size: int, num_classes: int,
                feature_dim: int) -> BaseHeadSplit:
    builder = plugins.registry("models").get(arch).obj
    model = builder(in_channels, image_size, num_classes, feature_dim)
    if not isinstance(model, BaseHeadSplit):
        raise TypeError(f"model {arch!r} must return a BaseHeadSplit, got {type(model).__name__}")
    return model
