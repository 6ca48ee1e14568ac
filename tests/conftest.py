"""Tiny Stable-Diffusion components built from configs (no downloads) and shared fixtures."""

import copy
import os
import sys
import tempfile
from pathlib import Path


# Hermetic: no network, and diffusers' dynamic-module cache in a throw-away folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="npi-hf-home-"))

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The tiny models' kernels are too small to split across threads: a core per worker runs the suite faster.
    torch.set_num_threads(1)

from negative_prompt_inversion.pipeline_negative_prompt_inversion import NegativePromptInversionPipeline  # noqa: E402
from toy_world.tokenizer import write_word_tokenizer  # noqa: E402
from toy_world.train import SCHEDULER_CONFIG  # noqa: E402


WORDS = (
    "a cat dog tiger red blue green circle square triangle on white black background big small striped and sitting"
    " wall photo of the"
).split()
SPLIT_WORDS = {"hippopotamus": ("hippo", "potamus"), "rhinoceros": ("rhino", "ceros")}
# Meant as one token per word and two per split word, but merges of earlier words fire first inside "background",
# "green", "striped", "sitting" and "rhinoceros", which encode as several pieces. The pinned outputs
# (test_pinned_outputs.py) were made with this vocabulary, so it stays until they are pinned again.


class StoredElsewhere(torch.Tensor):
    """A weight as a quantisation library (torchao) replaces it: a tensor subclass whose storage is not its values.
    Like torchao's `Float8Tensor` it can be detached (to become a parameter) and dequantised, and takes no views."""

    @staticmethod
    def __new__(cls, values):
        return torch.Tensor._make_wrapper_subclass(cls, values.shape, dtype=values.dtype, device=values.device)

    def __init__(self, values):
        self.values = values

    def dequantize(self):
        return self.values

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return cls(args[0].values.detach())
        raise NotImplementedError(f"{func} on a quantised weight")


def tiny_components(tokenizer_dir: Path, prediction_type: str = "epsilon", seed: int = 0, heads: int = 2):
    """Stable Diffusion 1.x's layout in miniature: cross-attention at both levels of a 16² latent. ``heads`` splits
    the 32 attention features (the weights do not depend on it): a CPU's fused attention runs two heads of 16 about
    5× faster than eight of 4, which the pinned outputs (test_pinned_outputs.py) were made with."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=heads,  # diffusers' legacy name for the number of heads
        norm_num_groups=32,
    )
    shrink_noise(unet)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, 32))
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": ddim_scheduler(prediction_type),
    }


def shrink_noise(unet: UNet2DConditionModel) -> None:
    """A small ε keeps DDIM round trips stable on random weights."""
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.mul_(0.05)


def tiny_vae(block_out_channels=(32, 64), **config) -> AutoencoderKL:
    """A VAE with one level per channel count: two levels downsample by 2, three by 4."""
    return AutoencoderKL(
        block_out_channels=block_out_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        latent_channels=4,
        norm_num_groups=32,
        **config,
    )


def tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int, **config) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
        **config,
    )


def ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's (and SDXL's) noise schedule with deterministic DDIM steps, as the toy model's."""
    return DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type})


def tiny_sdxl_components(tokenizer_dir: Path, seed: int = 0):
    """SDXL's layout in miniature: no attention at full latent resolution, two cross-attention levels (the coarser
    with two transformer blocks; two heads each, as ``tiny_components``), added text-time conditioning, two text
    encoders of different widths (32 + 48 = 80 cross-attention features, a 24-d pooled projection) and a second
    tokenizer that pads with "!" as SDXL's."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=32 + 48,
        attention_head_dim=2,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    )
    shrink_noise(unet)
    vae = tiny_vae(sample_size=64, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, 48, projection_dim=24))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "scheduler": ddim_scheduler(),
    }


def tiny_toy_model(folder: Path) -> Path:
    """A model folder as ``toy_world.train`` writes it (the toy world's tokenizer, float16 weights, toy world v1's
    geometry: 64 px images, 16² latents) holding tiny random weights: everything the toy world's harness, a resumed
    training run and the command line ask of a model, at a small fraction of a trained model's cost."""
    from toy_world import tokenizer, train

    tokenizer_dir = folder.parent / "toy-tokenizer"
    tokenizer.save_tokenizer(str(tokenizer_dir))
    modules = tiny_components(tokenizer_dir)
    torch.manual_seed(1)
    vae = tiny_vae(block_out_channels=(32, 64, 64)).eval()  # factor 4, as the toy models' VAE
    train.export(
        str(folder),
        vae,
        modules["unet"],
        modules["text_encoder"],
        modules["tokenizer"],
        record={"note": "tiny random weights (tests/conftest.py)"},
        tokenizer_from=str(tokenizer_dir),
    )
    return folder


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests (deselected by default: ``pytest -m gpu`` runs them) skip with the reason on a machine
    without CUDA."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    return tiny_toy_model(tmp_path_factory.mktemp("toy-model") / "model")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer"), WORDS, SPLIT_WORDS, strict=False)


@pytest.fixture(scope="session")
def components(tokenizer_dir):
    return tiny_components(tokenizer_dir)


@pytest.fixture(scope="session")
def sdxl_components(tokenizer_dir):
    return tiny_sdxl_components(tokenizer_dir)


# The fixtures' pipelines invert with NPI: most identities tested are NPI's (its reconstruction equals DDIM's at
# guidance 1, costs one UNet pass per step), and NPI inversions edit as any method. Direct Inversion, the default,
# has its own tests (test_direct_inversion.py), which ask for it by name.
NPI = {"inversion_method": "npi"}


@pytest.fixture()
def sdxl_pipe(sdxl_components):
    pipeline = NegativePromptInversionPipeline(**copy.deepcopy(sdxl_components), **NPI)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture()
def pipe(components):
    """A fresh pipeline per test over copies of the shared components, so dtype changes never leak."""
    pipeline = NegativePromptInversionPipeline(**copy.deepcopy(components), **NPI)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="session")
def shared_inversion(request):
    """``shared_inversion(prompt, steps, size=32, sdxl=False)``: the NPI inversion of ``scene_image(0, size)`` that
    ``pipe.invert`` (``sdxl_pipe.invert``) makes, computed once per session; each call hands out a deep copy, so a
    test may change what it gets."""
    made = {}

    def invert(prompt: str, steps: int, size: int = 32, sdxl: bool = False):
        key = (prompt, steps, size, sdxl)
        if key not in made:
            components = request.getfixturevalue("sdxl_components" if sdxl else "components")
            pipeline = NegativePromptInversionPipeline(**copy.deepcopy(components), **NPI)
            pipeline.set_progress_bar_config(disable=True)
            made[key] = pipeline.invert(scene_image(0, size), prompt, num_inference_steps=steps)
        return copy.deepcopy(made[key])

    return invert


def scene_image(seed: int = 0, size: int = 32) -> np.ndarray:
    """A smooth random RGB image (uint8 HWC): structure a VAE can encode, detail inversion must keep."""
    generator = np.random.default_rng(seed)
    coarse = generator.random((4, 4, 3))
    image = np.kron(coarse, np.ones((size // 4, size // 4, 1)))
    image = 0.8 * image + 0.2 * generator.random((size, size, 3))
    return (image * 255).astype(np.uint8)


class UNetCalls:
    """Counts UNet forwards and their batch sizes."""

    def __init__(self, unet):
        self.batches = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def latents_of(output):
    return output.images if isinstance(output.images, torch.Tensor) else torch.as_tensor(output.images)


# Rounding budgets. Two computations of the same quantity that differ only in rounding (another batch size, another
# attention kernel) may differ by a few eps per operation, relative to the quantity's scale; a budget counts those
# operations, so it holds on any IEEE machine yet stays far below what a real defect changes (a flipped threshold
# mask moves a latent by ~0.3, a wrong guidance by ~1e-2).
# One UNet pass: its widest reduction (3·3·64 = 576 terms) rounds like √576 = 24 eps of its activations, and kernels
# blocked per batch size (CPU GEMMs are) may change every one of those roundings.
UNET_OPS = 24


def tolerance(reference: torch.Tensor, ops: float) -> float:
    """Absolute tolerance for ``ops`` roundings of at most eps each, at the reference's scale (≥ 1, a latent's)."""
    return ops * torch.finfo(reference.dtype).eps * max(1.0, float(reference.abs().max()))


def edit_ops(steps: int, guidance_scale: float = 7.5, unet_ops: float = UNET_OPS) -> float:
    """Budget of a denoising run: every step's UNet rounding, amplified by ε_u + w·(ε_c − ε_u) by up to |1 − w| + w."""
    return unet_ops * (abs(1 - guidance_scale) + guidance_scale) * steps


def inversion_ops(steps: int, unet_ops: float = UNET_OPS) -> float:
    """Budget of an inversion: the rounding of step k's UNet pass is carried into every later step's input and passes
    through those steps' UNets again (a denoiser's gain is about one), so the k-th of n steps counts n − k + 1 times."""
    return unet_ops * steps * (steps + 1) / 2


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, ops: float):
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance(expected, ops))
