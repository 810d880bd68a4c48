"""``fedkd``: FedKD (Wu et al., Nature Communications 2022), adaptive mutual
distillation with SVD-compressed exchange.

Every client keeps a private *mentor* (its heterogeneous model), a copy of the
shared homogeneous *mentee* (architecture ``mentee_model``; by default the first
architecture of the run's model group, as HtFLlib) and a private W_h,
``Linear(D, D, bias=False)``, that maps mentee features to the mentor's feature
space. With CE_t, CE_s the two cross-entropies and w = 1 / (CE_t + CE_s) taken
as a weight (no gradient through it), each batch minimises

* mentor: ``CE_t + w·KL(p_s ‖ p_t) + w·MSE(H_t, sg[W_h H_s])``
* mentee: ``CE_s + w·KL(p_t ‖ p_s) + w·MSE(W_h H_s, sg[H_t])``

(sg = stop-gradient; KL is the batch-mean per-sample divergence of the other
model's detached softmax). The two hidden losses are the same distance but are
distinct objectives: the mentor's pulls H_t towards the mapped mentee features
and trains only the mentor; the mentee's pulls W_h·H_s towards the mentor's
features and trains the mentee and W_h. Gradients of each of the three parts
are clipped at norm ``grad_clip`` (10, as HtFLlib). Mentor and W_h use SGD with
``--lr``, the mentee SGD with ``mentee_lr``. Inference uses the mentor; the
mentee's accuracy is recorded as ``acc_mentee``.

**Compression.** Every parameter with two or more dimensions (a conv weight is
reshaped to out × in·kh·kw) is sent as a truncated SVD U_r, S_r, V_r with the
smallest rank r whose energy Σ_{i≤r} σ_i² reaches T·Σ σ_i², so the
reconstruction error is ‖W − U_r S_r V_r‖_F² ≤ (1 − T)·‖W‖_F². If the factors
would not be smaller than the matrix (r·(m + n + 1) ≥ m·n) the matrix goes dense.
Biases and BatchNorm weights (1-D) go dense. In round r of R the threshold is
T(r) = T_start + (T_end − T_start)·(r − 1)/(R − 1): T_start in round 1, T_end in
the last. The server reconstructs every upload, averages uniformly and sends
the average down compressed at the same threshold (from round 1 on: round 1
sends the server's initial mentee, so every client starts from the same one),
with the threshold itself as one float (``energy``) so the client compresses
its upload at the same T.

Traffic per client and round (float32), summed over mentee parameters θ:

* upload:   Σ over matrices W (m×n, rank r_W at T(r)) of 4·r_W·(m + n + 1) if that is
  below 4·m·n, else 4·m·n; plus 4·|θ| for every 1-D tensor θ. At most 4·|θ_mentee|.
* download: the same rule applied to the server's average, + 4 bytes (``energy``).

A higher threshold keeps a higher rank (never a lower one), so as T rises over
the rounds the bytes per round grow or stay equal; how large they are depends
on the spectrum of the trained weights.

Deviations from HtFLlib: (1) its two hidden losses are the same expression
computed twice and both back-propagate into both models (and the divisor is not
detached, so the distillation terms push the CEs up); here they are the distinct,
stop-gradient objectives above. (2) It runs ``np.linalg.svd`` on conv weights as
batches of kh×kw matrices (almost no compression); here conv weights are
reshaped to out × in·kh·kw. (3) Its rank search never selects full rank and
then keeps rank 0 (an all-zero matrix) when the threshold needs every singular
value; here r ≤ full rank and the dense fallback applies. (4) KL is the true
per-sample KL, not ``nn.KLDivLoss()``'s element mean. The attention-matrix
hidden loss of the paper (for transformers) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines._common import ParamsServer, check_model_name, seeded_module
from htfl_plugins.config import opt
from htfl_plugins.engine import Client, module_spec
from htfl_plugins.errors import HtflError

PREFIX = "mentee."


@dataclass
class FedKDOptions:
    mentee_model: str = opt("", "architecture of the shared mentee (default: the first "
                            "architecture of --models)")
    mentee_lr: float = opt(0.01, "SGD learning rate of the mentee (HtFLlib -mlr)", min=0.0)
    t_start: float = opt(0.95, "SVD energy threshold in round 1 (HtFLlib -Ts)", min=1e-6, max=1.0)
    t_end: float = opt(0.98, "SVD energy threshold in the last round (HtFLlib -Te)",
                       min=1e-6, max=1.0)
    grad_clip: float = opt(10.0, "gradient-norm clipping of mentor, mentee and W_h (0: none)",
                           min=0.0)

    def validate(self):
        if self.t_end < self.t_start:
            raise HtflError(f"fedkd: --t-end ({self.t_end}) must not be below --t-start "
                            f"({self.t_start})")


# ------------------------------------------------------------------ compression
def energy_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """Smallest r ≥ 1 with Σ_{i<r} σ_i² ≥ threshold · Σ σ_i² (σ sorted descending)."""
    e = singular_values.double() ** 2
    cum = torch.cumsum(e, 0)
    r = int(torch.searchsorted(cum, threshold * cum[-1]).item()) + 1
    return max(1, min(r, len(e)))


def threshold_at(options, round: int, rounds: int) -> float:
    """T(r): T_start in round 1 rising linearly to T_end in round ``rounds``."""
    if rounds <= 1:
        return options.t_start
    frac = min(max((round - 1) / (rounds - 1), 0.0), 1.0)
    return options.t_start + (options.t_end - options.t_start) * frac


def compress(params: dict[str, torch.Tensor], threshold: float,
             prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` → payload: ``prefix+name+'.U'/'.S'/'.V'`` for truncated
    matrices, ``prefix+name`` for tensors sent dense."""
    out = {}
    for name, p in params.items():
        p = p.detach().cpu().float()
        if p.dim() >= 2 and min(p.shape[0], p[0].numel()) > 1:
            w = p.reshape(p.shape[0], -1).double()
            m, n = w.shape
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = energy_rank(s, threshold)
            if r * (m + n + 1) < m * n:
                out[prefix + name + ".U"] = u[:, :r].float().contiguous()
                out[prefix + name + ".S"] = s[:r].float().contiguous()
                out[prefix + name + ".V"] = vh[:r].float().contiguous()
                continue
        out[prefix + name] = p.clone()
    return out


def decompress(payload, shapes: dict[str, torch.Size], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Payload → ``{name: tensor}`` for every name in ``shapes``."""
    out = {}
    for name, shape in shapes.items():
        if prefix + name in payload:
            out[name] = payload[prefix + name].float().reshape(shape)
        else:
            u, s, v = (payload[prefix + name + k].float() for k in (".U", ".S", ".V"))
            out[name] = ((u * s) @ v).reshape(shape)
    return out


def mentee_arch(options, ctx) -> str:
    return options.mentee_model or ctx.archs[0]


def build_mentee(options, ctx):
    arch = mentee_arch(options, ctx)
    return ctx.build_model(arch, seed_key=("fedkd-mentee", arch))


def kl_to(logits, target_logits):
    """KL(softmax(target) ‖ softmax(logits)), batch mean, target detached."""
    return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(target_logits.detach(), 1),
                    reduction="batchmean", log_target=True)


class FedKDClient(Client):
    def upload_spec(self):
        """Each mentee matrix dense (its own shape) or as SVD factors of any rank."""
        spec = module_spec(self.mentee, PREFIX)
        for name in list(spec):
            if len(spec[name][0]) >= 2:
                spec.update({f"{name}.{f}": (None, torch.float32) for f in "USV"})
        return spec

    def __init__(self, cid, arch, data, options, ctx):
        super().__init__(cid, arch, data, options, ctx)
        self.mentee = build_mentee(options, ctx)
        self.mentee_optimizer = torch.optim.SGD(self.mentee.parameters(), lr=options.mentee_lr)
        d = ctx.feature_dim
        self.w_h = seeded_module(ctx, ("fedkd-W_h", cid), lambda: nn.Linear(d, d, bias=False))
        self.w_optimizer = self.make_optimizer(self.w_h.parameters())
        self.energy = options.t_start

    def receive(self, payload):
        if "energy" in payload:
            self.energy = float(payload["energy"])
        shapes = {n: p.shape for n, p in self.mentee.named_parameters()}
        new = decompress(payload, shapes)
        with torch.no_grad():
            for n, p in self.mentee.named_parameters():
                p.copy_(new[n].to(p.device, p.dtype))

    def losses(self, x, y) -> dict[str, torch.Tensor]:
        """The mentor's and the mentee's loss terms on one batch."""
        h_t = self.model.base(x)
        out_t = self.model.head(h_t)
        h_s = self.mentee.base(x)
        out_s = self.mentee.head(h_s)
        ce_t, ce_s = F.cross_entropy(out_t, y), F.cross_entropy(out_s, y)
        w = 1.0 / (ce_t + ce_s).detach()
        mapped = self.w_h(h_s)
        parts = {
            "ce_t": ce_t, "ce_s": ce_s,
            "kd_t": w * kl_to(out_t, out_s), "kd_s": w * kl_to(out_s, out_t),
            "hid_t": w * F.mse_loss(h_t, mapped.detach()),
            "hid_s": w * F.mse_loss(mapped, h_t.detach()),
        }
        parts["mentor"] = parts["ce_t"] + parts["kd_t"] + parts["hid_t"]
        parts["mentee"] = parts["ce_s"] + parts["kd_s"] + parts["hid_s"]
        return parts

    def train(self) -> float:
        self.model.train()
        self.mentee.train()
        self.w_h.train()
        clip = self.options.grad_clip
        opts = (self.optimizer, self.mentee_optimizer, self.w_optimizer)
        total, count = 0.0, 0
        for _ in range(self.cfg.local_epochs):
            for x, y in self.batches():
                for o in opts:
                    o.zero_grad(set_to_none=True)
                parts = self.losses(x, y)
                (parts["mentor"] + parts["mentee"]).backward()  # disjoint gradients
                if clip > 0:
                    for m in (self.model, self.mentee, self.w_h):
                        torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
                for o in opts:
                    o.step()
                total += parts["mentor"].item() * len(y)
                count += len(y)
        return total / max(count, 1)

    def upload(self):
        return compress(dict(self.mentee.named_parameters()), self.energy)

    def extra_scores(self, x):
        self.mentee.eval()
        return {"mentee": self.mentee(x)}

    def state_dict(self):
        return {**super().state_dict(), "mentee": self.mentee.state_dict(),
                "mentee_optimizer": self.mentee_optimizer.state_dict(),
                "w_h": self.w_h.state_dict(), "w_optimizer": self.w_optimizer.state_dict(),
                "energy": self.energy}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.mentee.load_state_dict(state["mentee"])
        self.mentee_optimizer.load_state_dict(state["mentee_optimizer"])
        self.w_h.load_state_dict(state["w_h"])
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        self.energy = float(state["energy"])


class FedKDServer(ParamsServer):
    @classmethod
    def check(cls, options, ctx):
        check_model_name("fedkd", "mentee_model", mentee_arch(options, ctx), ctx)

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.params = {n: p.detach().cpu().clone()
                       for n, p in build_mentee(options, ctx).named_parameters()}

    def threshold(self, round: int) -> float:
        return threshold_at(self.options, round, self.cfg.rounds)

    def broadcast(self, round, selected):
        t = self.threshold(round)
        payload = compress(self.params, t)
        payload["energy"] = torch.tensor([t], dtype=torch.float32)
        return self.to_all(selected, payload)

    def update(self, round, uploads):
        if not uploads:
            return
        shapes = {n: p.shape for n, p in self.params.items()}
        models = [decompress(up, shapes) for up in uploads.values()]
        self.params = {n: torch.stack([m[n] for m in models]).mean(0) for n in shapes}


ALGORITHM = dict(name="fedkd", server=FedKDServer, client=FedKDClient, options=FedKDOptions,
                 summary="private mentor and shared mentee distil adaptively; mentee sent "
                         "as truncated SVD with a rising energy threshold (FedKD)")
