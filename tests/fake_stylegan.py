"""A tiny module with the interface of NVIDIA's StyleGAN ``G_ema`` (mapping,
synthesis, z_dim, c_dim, w_dim, num_ws, img_resolution), for adapter tests."""

import torch
import torch.nn as nn


class FakeG(nn.Module):
    def __init__(self, z_dim=8, c_dim=0, w_dim=6, num_ws=5, res=16):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.img_resolution, self.img_channels = res, 3
        self.map = nn.Linear(z_dim + c_dim, w_dim)
        self.to_img = nn.Linear(w_dim, 3 * res * res)
        self.last_ws = None
        self.last_c = None

    def mapping(self, z, c, truncation_psi=1.0):
        self.last_c = c
        x = z if c is None else torch.cat([z, c], 1)
        return self.map(x)[:, None, :].repeat(1, self.num_ws, 1)

    def synthesis(self, ws, noise_mode="random"):
        assert noise_mode == "const"
        self.last_ws = ws
        r = self.img_resolution
        return torch.tanh(self.to_img(ws[:, 0])).view(-1, 3, r, r)
