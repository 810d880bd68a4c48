"""The simplex equiangular tight frame (ETF) classifier and the ArcFace loss."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def simplex_etf(num_classes: int, seed: int) -> torch.Tensor:
    """K unit anchors (rows) in R^K whose pairwise cosine is -1/(K-1).

    M = sqrt(K/(K-1)) · P (I − 11ᵀ/K) with P orthogonal from the QR of a uniform
    random matrix. Built in float64, where QR is orthogonal to ~1e-15, so no
    retry loop is needed.
    """
    k = num_classes
    if k < 2:
        raise ValueError("an ETF needs at least two classes")
    a = np.random.default_rng(seed).random((k, k))
    p, _ = np.linalg.qr(a)
    m = math.sqrt(k / (k - 1)) * p @ (np.eye(k) - np.ones((k, k)) / k)
    anchors = m.T / np.linalg.norm(m.T, axis=1, keepdims=True)
    return torch.from_numpy(anchors).float()


def cosine_logits(outputs: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Cosine between the normalised outputs and each anchor: B×K."""
    return F.normalize(outputs, dim=1) @ anchors.t()


def arcface_loss(cos: torch.Tensor, y: torch.Tensor, s: float, m: float, eps: float = 1e-7,
                 monotone: bool = True) -> torch.Tensor:
    """Cross-entropy on s·cos, with the true class's angle θ widened by m.

    The arccos input is clamped to [−1+ε, 1−ε], so neither the forward value
    nor the gradient can become NaN. cos(θ + m) falls only while θ + m ≤ π;
    past that (θ > π − m) it rises again, so a sample near the antipode of its
    anchor is pushed further away and stays there. With ``monotone`` such
    samples get cos θ − m·sin m instead (the usual ArcFace safeguard), which
    always pulls them towards their anchor; without it the target is cos(θ + m)
    everywhere, as in the FedKTL authors' code.
    """
    cos_y = cos.gather(1, y[:, None]).clamp(-1 + eps, 1 - eps)
    target = torch.cos(torch.acos(cos_y) + m)
    if monotone:
        target = torch.where(cos_y > math.cos(math.pi - m), target, cos_y - m * math.sin(m))
    logits = cos.scatter(1, y[:, None], target) * s
    return F.cross_entropy(logits, y)
