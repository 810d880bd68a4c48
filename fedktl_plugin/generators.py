"""Pretrained generators behind one small interface.

An adapter knows its latent size, samples its own latent prior (the MMD target),
and turns latents into images in [0, 1]. Generators are frozen: nothing here is
trained.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import sys
from pathlib import Path

import torch
import torch.nn as nn

from htfl_plugins.errors import HtflError


class Generator:
    """Base adapter. Subclasses set ``latent_dim``, ``channels`` and ``image_size``."""

    name = "generator"
    latent_dim: int
    channels: int = 3
    image_size: int

    @classmethod
    def check(cls, path: str) -> None:
        """Raise HtflError (one line saying what to install or where to put the
        file) if the generator cannot be loaded."""

    def __init__(self, path: str, device: torch.device, options=None):
        self.device = device
        self.options = options

    def sample_prior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_file(package: str, filename: str, pip_name: str, sha256: str, path: str = "") -> Path:
    """A weight file shipped inside an installed package, located without importing
    the package, and checked against its published hash."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise HtflError(f"generator weights {file} not found")
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise HtflError(f"generator weights missing: install them with "
                            f"`pip install --no-deps {pip_name}` (or pass --generator-path)")
        file = Path(list(spec.submodule_search_locations)[0]) / filename
        if not file.is_file():
            raise HtflError(f"{pip_name} is installed but {file} is missing; reinstall it with "
                            f"`pip install --force-reinstall --no-deps {pip_name}`")
    if sha256 and _sha256(file) != sha256:
        raise HtflError(f"{file} does not have the expected sha256 {sha256[:12]}…; the file is "
                        f"corrupt or another version: reinstall `pip install --no-deps {pip_name}`")
    return file


def _tconv_stack(widths: list[int], dropout_after_first: float = 0.0) -> nn.Sequential:
    """DCGAN generator body: 4×4 transposed convs (first 1→4 px, then ×2 each),
    BatchNorm + ReLU between, Tanh at the end."""
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.ConvTranspose2d(cin, cout, 4, 1 if i == 0 else 2, 0 if i == 0 else 1, bias=False))
        if last:
            layers.append(nn.Tanh())
        else:
            layers += [nn.BatchNorm2d(cout), nn.ReLU(True)]
            if i == 0 and dropout_after_first:
                layers.append(nn.Dropout(dropout_after_first))
    return nn.Sequential(*layers)


class _DCGANBody(nn.Module):
    def __init__(self, widths, dropout=0.0):
        super().__init__()
        self.main = _tconv_stack(widths, dropout)

    def forward(self, z):
        return self.main(z[:, :, None, None])


# ------------------------------------------------------------------ DCGANs shipped in PyPI packages
class PackagedDCGAN(Generator):
    """A DCGAN generator whose weights ship inside a PyPI package: the file is found
    through the installed package (never imported), its sha256 checked, and loaded
    with ``weights_only=True`` into this module's own copy of the architecture."""

    PACKAGE: str
    FILE: str
    PIP: str
    SHA256: str
    WIDTHS: list[int]
    DROPOUT = 0.0

    @classmethod
    def weights(cls, path: str = "") -> Path:
        return package_file(cls.PACKAGE, cls.FILE, cls.PIP, "" if path else cls.SHA256, path)

    @classmethod
    def check(cls, path: str) -> None:
        cls.weights(path)

    @staticmethod
    def state_of(checkpoint):
        """The generator's state dict inside the loaded checkpoint."""
        return checkpoint

    def __init__(self, path: str, device, options=None):
        super().__init__(path, device, options)
        file = self.weights(path)
        try:
            state = self.state_of(torch.load(file, map_location="cpu", weights_only=True))
            self.net = _DCGANBody(self.WIDTHS, self.DROPOUT)
            self.net.load_state_dict(state)
        except Exception as exc:
            raise HtflError(f"cannot read generator weights {file}: {exc}") from None
        self.net.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def synthesize(self, latents):
        return ((self.net(latents.to(self.device)) + 1) / 2).clamp(0, 1)


class DCGANFace(PackagedDCGAN):
    """The DCGAN of ``gan_face_generate==1.1.1`` (MIT licence), trained on DigiFace-1M
    synthetic faces (research use): 64×64 RGB, z ∈ R^100 ~ N(0, I)."""

    name = "dcgan-face"
    latent_dim = 100
    image_size = 64
    PACKAGE, FILE, PIP = "gan_face_generate", "weights.tar", "gan_face_generate==1.1.1"
    SHA256 = "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f"
    WIDTHS = [100, 512, 256, 128, 64, 3]

    @staticmethod
    def state_of(checkpoint):
        return checkpoint["netG_state_dict"]

    def sample_prior(self, n, generator):
        return torch.randn(n, self.latent_dim, generator=generator).to(self.device)


class OmniArtEyes(PackagedDCGAN):
    """The class-conditional DCGAN of ``omniart-eye-generator==0.1`` (MIT licence),
    trained on the OmniArt eye dataset: 128×128 RGB, 8 eye colours. Its latent is
    the generator's input [z ∈ R^100 ; label ∈ R^8]; the prior draws z ~ N(0, I)
    and a uniformly random one-hot colour (the marginal over classes, as for
    StyleGAN-XL). The package is never imported (it loads CUDA tensors at import
    time); its weight file is read by path."""

    name = "omniart-eyes"
    latent_dim = 108
    image_size = 128
    PACKAGE, FILE, PIP = "omniart_eye_generator", "generator_model_state.pth", "omniart-eye-generator==0.1"
    SHA256 = "dd486abbd738bfe3d28ddd46987bec11e3842ddcc8c28ccc5251b52c6ecf4da0"
    WIDTHS = [108, 1024, 512, 256, 128, 64, 3]
    DROPOUT = 0.2

    def sample_prior(self, n, generator):
        z = torch.randn(n, 100, generator=generator)
        labels = torch.randint(0, 8, (n,), generator=generator)
        return torch.cat([z, nn.functional.one_hot(labels, 8).float()], 1).to(self.device)


# ------------------------------------------------------------------ StyleGAN2/3/XL pickles
class StyleGAN(Generator):
    """``G_ema`` from an NVIDIA StyleGAN2/3/XL network pickle given by path (NVIDIA's
    ``dnnlib``/``torch_utils`` must be importable, e.g. via --stylegan-utils). The
    aligned latent lives in W: the mapping output at layer 0, repeated over all
    ``num_ws`` layers to synthesise (W, not W+). The prior is the mapping of
    z ~ N(0, I) (with a uniformly random class for conditional models), no
    truncation."""

    name = "stylegan"

    @classmethod
    def check(cls, path: str) -> None:
        if not path:
            raise HtflError("the stylegan generator needs --generator-path pointing to a network "
                            "pickle (e.g. stylegan-xl imagenet64.pkl or a stylegan3 .pkl)")
        if not Path(path).expanduser().is_file():
            raise HtflError(f"generator pickle {path} not found")

    def __init__(self, path: str, device, options=None):
        super().__init__(path, device, options)
        self.check(path)
        utils = getattr(options, "stylegan_utils", "") if options is not None else ""
        if utils and utils not in sys.path:
            sys.path.insert(0, utils)
        try:
            with open(Path(path).expanduser(), "rb") as fh:
                g = pickle.load(fh)["G_ema"]
        except ModuleNotFoundError as exc:
            raise HtflError(f"loading {path} needs NVIDIA's stylegan code ({exc.name}); pass "
                            "--stylegan-utils DIR with dnnlib/ and torch_utils/") from None
        except (KeyError, pickle.UnpicklingError, EOFError) as exc:
            raise HtflError(f"{path} is not a StyleGAN network pickle with G_ema: {exc}") from None
        self.g = g.eval().requires_grad_(False).to(device)
        self.latent_dim = int(g.w_dim)
        self.image_size = int(getattr(g, "img_resolution", 0))
        self.channels = int(getattr(g, "img_channels", 3))

    def sample_prior(self, n, generator):
        z = torch.randn(n, self.g.z_dim, generator=generator).to(self.device)
        c = None
        if getattr(self.g, "c_dim", 0):
            labels = torch.randint(0, self.g.c_dim, (n,), generator=generator)
            c = nn.functional.one_hot(labels, self.g.c_dim).float().to(self.device)
        with torch.no_grad():
            ws = self.g.mapping(z, c, truncation_psi=1)
        return ws[:, 0, :]

    @torch.no_grad()
    def synthesize(self, latents):
        ws = latents.to(self.device)[:, None, :].repeat(1, self.g.num_ws, 1)
        img = self.g.synthesis(ws, noise_mode="const")
        return ((img + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------ Stable Diffusion
class StableDiffusion(Generator):
    """Stable Diffusion (v1.5 layout) through ``diffusers`` from a local folder. The
    aligned latent is the initial noise x_T (4×(S/8)×(S/8), flattened); the prompt
    is fixed for every class, so the class lives in x_T alone. Prior: N(0, I)."""

    name = "stable-diffusion"

    @classmethod
    def check(cls, path: str) -> None:
        if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("transformers") is None:
            raise HtflError("the stable-diffusion generator needs diffusers and transformers: "
                            "pip install 'htfl[diffusion]'")
        if not path or not (Path(path).expanduser() / "model_index.json").is_file():
            raise HtflError("the stable-diffusion generator needs --generator-path pointing to a "
                            "diffusers folder with model_index.json (e.g. stable-diffusion-v1-5)")

    def __init__(self, path: str, device, options=None, pipe=None):
        super().__init__(path, device, options)
        if pipe is None:
            self.check(path)
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(str(Path(path).expanduser()),
                                                           safety_checker=None,
                                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.prompt = getattr(options, "prompt", "a cat")
        self.guidance = getattr(options, "guidance", 7.5)
        self.steps = getattr(options, "sd_steps", 50)
        c = pipe.unet.config.in_channels
        s = pipe.unet.config.sample_size
        self.latent_shape = (c, s, s)
        self.latent_dim = c * s * s
        self.image_size = s * pipe.vae_scale_factor

    def sample_prior(self, n, generator):
        return torch.randn(n, self.latent_dim, generator=generator).to(self.device)

    @torch.no_grad()
    def synthesize(self, latents):
        x_t = latents.to(self.device).reshape(-1, *self.latent_shape)
        out = self.pipe(prompt=[self.prompt] * len(x_t), negative_prompt=[""] * len(x_t),
                        latents=x_t,  # the pipeline scales by init_noise_sigma itself
                        num_inference_steps=self.steps, guidance_scale=self.guidance,
                        eta=0.0, output_type="pt")
        return out.images.float().clamp(0, 1)


BUILTIN = [
    (DCGANFace, "DCGAN, 64×64 synthetic faces, z∈R^100 (gan_face_generate 1.1.1; default)"),
    (OmniArtEyes, "conditional DCGAN, 128×128 eyes, [z∈R^100; colour∈R^8] (omniart-eye-generator 0.1)"),
    (StyleGAN, "StyleGAN2/3/XL G_ema from --generator-path, W space"),
    (StableDiffusion, "Stable Diffusion via diffusers from --generator-path, x_T space"),
]
