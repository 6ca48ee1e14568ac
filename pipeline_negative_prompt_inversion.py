# Copyright 2026 The NegativePromptInversionPipeline authors. Licensed under the Apache License, Version 2.0.
"""Real-image editing with Stable Diffusion 1.x/2.x and SDXL: invert a photo, then regenerate it under a new prompt.

    inversion = pipe.invert(image, "a cat sitting on a wall")          # DDIM inversion (+ null-text optimisation)
    edited = pipe(prompt="a dog sitting on a wall", inversion=inversion).images[0]

Inversion methods (constructor flag ``inversion_method``, overridable per call):

- ``"npi"``  negative-prompt inversion (Miyake et al. 2023): the source prompt's embedding is the unconditional
  embedding, the closed-form solution of null-text inversion. No optimisation; reconstruction costs one UNet pass.
- ``"nti"``  null-text inversion (Mokady et al. 2023): one optimised unconditional embedding per step.
- ``"ddim"`` plain DDIM inversion; regeneration uses the empty prompt as unconditional embedding.
- ``"direct"`` Direct Inversion (Ju et al. 2024, "PnP Inversion"): DDIM inversion; at edit time the source branch is
  put back on the stored trajectory after every step and the targets are guided against the null embedding E("").
  The inversion is DDIM's, so an NPI or DDIM inversion can be edited as ``"direct"`` too.

Editing, from one inversion: plain guidance, or techniques given as small configuration objects:
``PromptToPrompt`` attention control (word swap, refinement, re-weighting, ``LocalBlend``), ``MasaCtrl`` (mutual
self-attention) and ``ProximalGuidance`` (ProxEdit, Han et al. 2023):

    pipe(prompt="a dog sitting on a wall", inversion=inversion,
         attention_control=PromptToPrompt(local_blend=LocalBlend(("cat", "dog"))), proximal_guidance="soft")

SDXL (``text_encoder_2`` and ``tokenizer_2`` given) adds its pooled text embedding and time ids to every UNet call
(`encode_text`, `_added_conditioning`); everything else is shared with SD 1.x/2.x.

Equations follow ``ALGORITHMS`` in the project's reference notes; each formula below names its source.
"""

import base64
import errno
import functools
import hashlib
import importlib
import itertools
import json
import math
import numbers
import operator
import os
import stat
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import numpy as np
import PIL.Image
import PIL.ImageOps
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import DDIMScheduler, KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


if not __package__:  # copy-paste use: a top-level module beside the ``attention_processors`` folder
    # Acting as the package of that folder lets the relative imports below serve every way of loading this file
    # (an absolute fallback would make diffusers' loader warn "pip install attention_processors" on each load).
    __path__ = [os.path.dirname(os.path.abspath(__file__))]
    __package__ = __name__

# One import per leaf: diffusers' custom-pipeline loader copies exactly the files imported this way.
from .attention_processors.npi_attention_store import AttentionStore, heat_map_grid, local_blend_mask
from .attention_processors.npi_controlled_attention import ControlledAttnProcessor
from .attention_processors.npi_mutual_self_attention import MutualSelfAttention
from .attention_processors.npi_prompt_to_prompt import (
    CrossAttentionControl,
    check_window,
    cross_attention_window,
    find_word,
    refinement,
    reweighting,
    self_attention_window,
    stack_edits,
    word_swap,
    word_token_indices,
)


logger = logging.get_logger(__name__)


def _drop_stale_pipeline_classes(namespace: dict) -> None:
    """Remove pipeline classes that another file left in this module's namespace.

    diffusers imports every custom pipeline loaded from a folder as one module, `diffusers_modules.local.pipeline`,
    and re-executes that module object in place. A class of a pipeline loaded earlier would stay in the namespace and
    make diffusers refuse to load this one ("Multiple classes that inherit from DiffusionPipeline").
    """
    for name, value in list(namespace.items()):
        stale = isinstance(value, type) and issubclass(value, DiffusionPipeline)
        if stale and value.__module__ == namespace["__name__"]:
            del namespace[name]


_drop_stale_pipeline_classes(globals())

PROXIMAL_MODES = ("soft", "hard")
EDIT_TYPES = ("replace", "refine")
INVERSION_FORMAT = "negative-prompt-inversion/1"
# Useful guidance scales are 1–20; far beyond, ε̃ = ε_u + w·d drives the latents to inf within a few steps.
MAX_GUIDANCE_SCALE = 100.0
# Re-weighting multiplies a word's cross-attention probabilities, whose sum over the prompt is 1, by a factor c:
# the word's value then counts c times. The P2P paper edits with c in [−2, 2] (negative: the word's effect
# reversed), the references' examples go up to 5; at |c| = 10 one word already outweighs the whole prompt tenfold,
# and beyond it the attention output leaves the range the model was trained on until it overflows.
MAX_REWEIGHT = 10.0

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import load_image

        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...     custom_pipeline="pipeline_negative_prompt_inversion.py",
        ...     trust_remote_code=True,
        ...     inversion_method="direct",
        ...     safety_checker=None,
        ...     dtype=torch.float16,
        ... ).to("cuda")
        >>> image = load_image("cat.png")
        >>> inversion = pipe.invert(image, "a cat sitting on a wall")

        >>> # Direct Inversion with prompt-to-prompt: the source branch follows the inversion exactly
        >>> edited = pipe(
        ...     prompt="a dog sitting on a wall",
        ...     inversion=inversion,
        ...     attention_control=pipe.PromptToPrompt(cross_replace_steps=0.4, self_replace_steps=0.6),
        ...     negative_prompt="blurry",
        ... ).images[0]

        >>> # the same inversion, edited as negative-prompt inversion with a local blend
        >>> edited = pipe(
        ...     prompt="a dog sitting on a wall",
        ...     inversion=inversion,
        ...     inversion_method="npi",
        ...     attention_control=pipe.PromptToPrompt(local_blend=pipe.LocalBlend(("cat", "dog"))),
        ... ).images[0]
        ```
"""


# =================================================================================================================
# The formulas. Each is a pure function whose body is its equation.


def predict_x0(latents: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # DDIM (Song et al. 2021) Eq. 12, "predicted x0": (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t
    return (latents - (1 - alpha).sqrt() * noise) / alpha.sqrt()


def renoise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # DDIM Eq. 12 with σ = 0: √ᾱ·x0 + √(1−ᾱ)·ε
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def ddim_step(latents: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, alpha_next: torch.Tensor):
    """Deterministic DDIM from noise level ``alpha`` to ``alpha_next``; inversion is the same step run upwards."""
    return renoise(predict_x0(latents, noise, alpha), noise, alpha_next)


def v_prediction_to_noise(v: torch.Tensor, latents: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # Salimans & Ho 2022, v = √ᾱ·ε − √(1−ᾱ)·x0  ⇒  ε = √ᾱ·v + √(1−ᾱ)·z_t
    return alpha.sqrt() * v + (1 - alpha).sqrt() * latents


def classifier_free_guidance(noise_uncond, direction, guidance_scale):
    # Ho & Salimans 2022: ε̃ = ε_u + w·d with the guidance direction d = ε_c − ε_u
    return noise_uncond + guidance_scale * direction


def rescale_guidance(noise: torch.Tensor, noise_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    # Lin et al. 2024, §3.4: φ·ε̃·σ_c/σ̃ + (1 − φ)·ε̃, written ε̃·(1 + φ(σ_c/σ̃ − 1)) so that a branch whose
    # guidance changed nothing (NPI's source: ε̃ = ε_c) is returned bit for bit
    dims = tuple(range(1, noise.dim()))
    ratio = noise_cond.std(dim=dims, keepdim=True) / noise.std(dim=dims, keepdim=True)
    return noise * (1 + guidance_rescale * (ratio - 1))


def sdxl_time_ids(image_size: tuple[int, int]) -> list[int]:
    # SDXL micro-conditioning (Podell et al. 2023, §2.2): (original h, w, crop top, left, target h, w). A photo
    # inverted whole is its own original, uncropped: the conditioning SDXL generates well-framed images with.
    height, width = image_size
    return [height, width, 0, 0, height, width]


def soft_threshold(direction: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    # ProxEdit Eq. 7, proximal operator of the ℓ1 norm: sign(d)·max(|d| − λ, 0)
    return direction.sign() * (direction.abs() - threshold).clamp_min(0)


def hard_threshold(direction: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    # ProxEdit Eq. 8, proximal operator of the ℓ0 norm: d·[|d| > λ]
    return direction * (direction.abs() > threshold)


def per_sample_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of each sample's values, shaped to broadcast against them."""
    flat = values.flatten(1).float()
    return torch.quantile(flat, q, dim=1).view(-1, *([1] * (values.dim() - 1)))


def proximal_direction(direction: torch.Tensor, mode: str, quantile: float, threshold: float | None):
    """ProxEdit §3.2: threshold the guidance direction of each sample; returns it and λ (per sample)."""
    if threshold is None:
        threshold = per_sample_quantile(direction.abs(), quantile)
    else:
        threshold = torch.full(
            (len(direction), *[1] * (direction.dim() - 1)), float(threshold), device=direction.device
        )
    operator = soft_threshold if mode == "soft" else hard_threshold
    return operator(direction, threshold), threshold


def rounding_floor(noise_cond: torch.Tensor, ulps: float = 256) -> torch.Tensor:
    # δ = c·eps·max|ε_c| per sample: |d| below it is rounding noise of ε (d ≡ 0 exactly for a target equal to its
    # source, yet ~10 ulps that vary with the batch size); c = 256 ≈ √65536 covers an SD UNet's widest reductions
    # and stays far below the λ of real edits (≳ 1e-3·max|ε|)
    scale = noise_cond.abs().amax(dim=tuple(range(1, noise_cond.dim())), keepdim=True)
    return ulps * torch.finfo(noise_cond.dtype).eps * scale


def edit_region(direction: torch.Tensor, threshold: torch.Tensor, dilation: int) -> torch.Tensor:
    # ProxEdit §3.3: the edit mask M = [|prox(d)| > λ] per channel, dilated by a (2r+1)² max-pool
    mask = (direction.abs() > threshold).float()
    if dilation > 0:
        mask = F.max_pool2d(mask, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return mask


def pin_to_trajectory(latents: torch.Tensor, anchor: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    # PnP Inversion (Ju et al. 2024), Alg. 1: z_src ← z_src + (z*_{t−1} − z_src), i.e. z*_{t−1} bit for bit
    return latents.index_copy(0, pinned, anchor[pinned])


def guide_towards(latents: torch.Tensor, anchor: torch.Tensor, region: torch.Tensor, step_size: float):
    # ProxEdit §3.3 inversion guidance (anchor = z*_{t−1}) and App. B reconstruction guidance (anchor = z*_0):
    # z ← z − η·(z − anchor)·(1 − M), with ``region`` = 1 − M
    return latents - step_size * (latents - anchor) * region


# =================================================================================================================
# Inversion methods: how each inverts, and which unconditional embedding each kind of branch uses at edit time


@dataclass(frozen=True)
class InversionMethod:
    """One row of `INVERSION_METHODS` (ALGORITHMS §1–§3, §8). Every method inverts by DDIM (§1); NTI then fits
    per-step unconditional embeddings to the trajectory. Unconditional embeddings are named by where they come from:
    ``"source"`` E(source prompt), ``"negative"`` the null embedding E(negative prompt) (E("") unless the call gives
    ``negative_prompt``; zeros on SDXL), ``"null_text"`` NTI's optimised U[i]."""

    optimises_null_text: bool  # NTI: DDIM inversion, then per-step unconditional embeddings fitted to it
    uncond: str  # unconditional embedding of reconstructions and of targets guided against the inversion
    null: str  # the null embedding: of null-guided targets (MasaCtrl's, ``target_guidance="null"``)
    pins_source: bool = False  # sources and reconstructions sit on the stored trajectory after every step


INVERSION_METHODS = {
    "npi": InversionMethod(optimises_null_text=False, uncond="source", null="negative"),  # Miyake et al. 2023
    "nti": InversionMethod(optimises_null_text=True, uncond="null_text", null="null_text"),  # Mokady et al. 2023
    "ddim": InversionMethod(optimises_null_text=False, uncond="negative", null="negative"),
    # Ju et al. 2024 (PnP Inversion), §4: DDIM's targets, a source pinned to the trajectory (`pin_to_trajectory`)
    "direct": InversionMethod(optimises_null_text=False, uncond="negative", null="negative", pins_source=True),
}
# What a target's guidance direction ε_c − ε_u is taken against (``target_guidance``): the inversion method's own
# unconditional embedding, or the null embedding. PnP Inversion (Ju et al. 2024, §4) guides targets against E("").
TARGET_GUIDANCES = ("inversion", "null")
_UNCOND_NAMES = {
    "source": "E(source prompt)",
    "negative": "the null embedding",
    "null_text": "its optimised null text",
}


# =================================================================================================================
# Inversion result


def _file_digest(metadata: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata and every tensor, so any edit of a saved inversion is detected on load."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode() + str(tensors[name].dtype).encode() + str(tuple(tensors[name].shape)).encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class InvalidInversionError(ValueError):
    """An inversion file or object that `invert` cannot have produced; the message names it and every problem."""


_TENSOR_NAMES = (
    "latents",
    "prompt_embeds",
    "timesteps",
    "null_embeds",
    "null_text_losses",
    "pooled_prompt_embeds",
    "null_pooled_embeds",
)
_REQUIRED_TENSORS = ("latents", "prompt_embeds", "timesteps")
_METADATA_FIELDS = ("source_prompts", "method", "guidance_scale", "image_size", "model_signature")


@dataclass
class InversionResult:
    r"""Everything an edit needs from an inverted image (or batch of images).

    Attributes:
        latents (`torch.Tensor` of shape `(batch, steps + 1, channels, height // f, width // f)`):
            The DDIM inversion trajectory z_0 … z_T (float32); ``latents[:, 0]`` encodes the image.
        prompt_embeds (`torch.Tensor` of shape `(batch, tokens, dim)`):
            Text embedding E(source prompt) used for the inversion.
        source_prompts (`list[str]`): The source prompts.
        timesteps (`torch.Tensor` of shape `(steps,)`): Denoising timesteps, descending.
        method (`str`): ``"npi"``, ``"nti"``, ``"ddim"`` or ``"direct"``; all but NTI store only the DDIM
            trajectory (their unconditional embeddings are rules: E(source) for NPI, E("") for DDIM and Direct
            Inversion), NTI adds ``null_embeds``. Files of NPI, DDIM and Direct Inversion differ only in this name.
        guidance_scale (`float`): Guidance scale the inversion was prepared for (NTI optimises for it).
        image_size (`tuple[int, int]`): ``(height, width)`` in pixels after preprocessing.
        null_embeds (`torch.Tensor` of shape `(batch, steps, tokens, dim)`, *optional*):
            NTI's optimised unconditional embedding for each denoising step.
        null_text_losses (`torch.Tensor` of shape `(batch, steps, inner_steps)`, *optional*):
            NTI's loss before each inner optimisation step (NaN after early stopping).
        model_signature (`dict`): Fingerprint of the models that produced the inversion.
        pooled_prompt_embeds (`torch.Tensor` of shape `(batch, dim)`, *optional*):
            SDXL only: text_encoder_2's pooled embedding of the source prompt (the time ids follow from
            ``image_size``). Its presence marks an SDXL inversion.
        null_pooled_embeds (`torch.Tensor` of shape `(batch, dim)`, *optional*):
            SDXL with NTI only: the pooled embedding of the unconditional branch, that of NTI's initialisation
            (E(source) or the null prompt), kept fixed while the sequence embedding is optimised.
    """

    # Identifies the class across copies of this file: diffusers re-executes the file on every load.
    format: ClassVar[str] = INVERSION_FORMAT

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    source_prompts: list[str]
    timesteps: torch.Tensor
    method: str
    guidance_scale: float
    image_size: tuple[int, int]
    null_embeds: torch.Tensor | None = None
    null_text_losses: torch.Tensor | None = None
    model_signature: dict = field(default_factory=dict)
    pooled_prompt_embeds: torch.Tensor | None = None
    null_pooled_embeds: torch.Tensor | None = None

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def __len__(self) -> int:
        return len(self.source_prompts)

    def __getitem__(self, index: int) -> "InversionResult":
        """The inversion of image ``index`` of the batch; negative indices count from the end, as in a list."""
        if isinstance(index, bool):
            raise TypeError("InversionResult indices must be integers, got bool.")
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"InversionResult indices must be integers, got {type(index).__name__}.") from None
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} is out of range for an inversion of {len(self)} image(s).")
        pick = slice(index % len(self), index % len(self) + 1)
        per_image = {name: tensor[pick] for name, tensor in self._present().items() if name != "timesteps"}
        return InversionResult(
            **per_image,
            source_prompts=self.source_prompts[pick],
            timesteps=self.timesteps,
            method=self.method,
            guidance_scale=self.guidance_scale,
            image_size=self.image_size,
            model_signature=self.model_signature,
        )

    def _present(self) -> dict:
        """The tensor fields that are set, by name."""
        return {name: getattr(self, name) for name in _TENSOR_NAMES if getattr(self, name) is not None}

    def _tensors(self) -> dict[str, torch.Tensor]:
        # own copies: safetensors refuses tensors that share memory (NTI from the prompt: pooled null = pooled source)
        return {
            name: tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
            for name, tensor in self._present().items()
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.safetensors`` file whose header carries the JSON metadata and a SHA-256 of every tensor.

        The file appears whole or not at all (written beside it, then renamed over it), with the permissions the
        user's umask gives new files. Every file-system problem raises an `OSError` naming ``path``.
        """
        path = _file_path(path, "save the inversion to")
        action = f"Cannot save the inversion to {path}"
        _check_writable(path, action)
        self._check_consistency(f"inversion to save as {path}")  # never write a file `load` rejects
        tensors = self._tensors()
        metadata = {
            "format": INVERSION_FORMAT,
            "source_prompts": self.source_prompts,
            "method": self.method,
            "guidance_scale": self.guidance_scale,
            "image_size": list(self.image_size),
            "model_signature": self.model_signature,
        }
        metadata["sha256"] = _file_digest(metadata, tensors)
        data = safetensors.torch.save(tensors, metadata={"inversion": json.dumps(metadata)})
        _write_atomically(os.path.realpath(path), data, action)  # through a symbolic link, not over it

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InversionResult":
        """Read a file written by `save`. safetensors holds only tensors, so loading can never run code.

        A file that cannot be read raises an `OSError` naming it (`FileNotFoundError`, `IsADirectoryError`,
        `PermissionError`, ...). The checksum only catches accidents (anyone can recompute it), so the content is
        validated as well; every problem with it raises `InvalidInversionError` naming the file.
        """
        path = _file_path(path, "load an inversion from")
        try:
            header, data = _read_inversion_file(path)
            tensors = safetensors.torch.load(data)
            metadata = json.loads(header["inversion"])
        except OSError as error:
            raise _naming_path(error, f"Cannot read the inversion file {path}") from error
        except Exception as error:  # any unreadable header or body is the same problem to the user
            raise InvalidInversionError(
                f"{path} is not an inversion file written by InversionResult.save: {error}"
            ) from error
        file_format = metadata.get("format") if isinstance(metadata, dict) else None
        if file_format != INVERSION_FORMAT:
            raise InvalidInversionError(f"{path}: unknown inversion format {file_format!r}.")
        if metadata.pop("sha256", None) != _file_digest(metadata, tensors):
            raise InvalidInversionError(f"{path}: checksum mismatch; the file was modified after it was saved.")
        _check_entries(path, metadata, tensors)
        result = cls(
            **{name: tensors.get(name) for name in _TENSOR_NAMES}, **{key: metadata[key] for key in _METADATA_FIELDS}
        )
        result._check_consistency(path)
        # JSON has no tuples, and a file may hold 7 for 7.0; validated above, so these conversions cannot fail.
        result.image_size, result.guidance_scale = tuple(result.image_size), float(result.guidance_scale)
        return result

    def _check_consistency(self, where: str, vae_scale_factor: int | None = None) -> None:
        """Raise `InvalidInversionError` naming ``where`` unless every field is what `invert` would have produced.

        The one validation for files (`load`) and for objects handed to a pipeline (`check_inversion`, which also
        knows the VAE factor ``image_size`` must be the latent size times).
        """
        # Tensor checks need a valid batch size and image size; with broken metadata they would only add noise.
        problems = self._metadata_problems() or self._tensor_problems(vae_scale_factor)
        if problems:
            raise _invalid(where, problems)

    def _metadata_problems(self) -> list[str]:
        problems = []
        prompts, size, scale = self.source_prompts, self.image_size, self.guidance_scale
        if not (isinstance(prompts, list) and prompts and all(isinstance(prompt, str) for prompt in prompts)):
            problems.append(f"source_prompts must be a non-empty list of strings, got {prompts!r}")
        if self.method not in INVERSION_METHODS:
            problems.append(f"method {self.method!r} is not one of {list(INVERSION_METHODS)}")
        if not (_is_real(scale) and _in_range(scale, 0, MAX_GUIDANCE_SCALE)):
            problems.append(f"guidance_scale must lie in [0, {MAX_GUIDANCE_SCALE}], got {scale!r}")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_real(n, True) and n > 0 for n in size)):
            problems.append(f"image_size must be two positive integers, got {size!r}")
        if not isinstance(self.model_signature, dict):
            problems.append("model_signature must be a dict")
        return problems

    def _tensor_problems(self, vae_scale_factor: int | None) -> list[str]:
        present = self._present()
        expected = [name for name in _TENSOR_NAMES if name in present or name in _REQUIRED_TENSORS]
        not_tensors = [name for name in expected if not isinstance(present.get(name), torch.Tensor)]
        if not_tensors:
            return [f"{', '.join(not_tensors)} must be tensors"]
        if self.timesteps.dim() != 1 or len(self.timesteps) == 0:  # every other shape is counted in steps
            return [f"timesteps of shape {tuple(self.timesteps.shape)}, expected one or more steps"]
        return (
            self._shape_problems(present)
            + self._dtype_problems(present)
            + self._method_problems(present)
            + _value_problems(present)
            + self._image_size_problems(vae_scale_factor)
        )

    def _shape_problems(self, present: dict[str, torch.Tensor]) -> list[str]:
        batch, steps, embedding = len(self.source_prompts), len(self.timesteps), tuple(self.prompt_embeds.shape[1:])
        pooled = None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds.shape[1:]
        patterns = {  # None: any size
            "latents": (batch, steps + 1, None, None, None),
            "prompt_embeds": (batch, None, None),
            "timesteps": (steps,),
            "null_embeds": (batch, steps, *embedding),
            "null_text_losses": (batch, steps, None),
            "pooled_prompt_embeds": (batch, None),
            "null_pooled_embeds": (batch, *(pooled or [None])),
        }
        return [
            f"{name} of shape {tuple(tensor.shape)}, expected {_shape_pattern(patterns[name])}"
            for name, tensor in present.items()
            if not _fits(tensor.shape, patterns[name])
        ]

    def _dtype_problems(self, present: dict[str, torch.Tensor]) -> list[str]:
        problems = [
            f"{name} of dtype {tensor.dtype}, expected a floating-point dtype"
            for name, tensor in present.items()
            if name != "timesteps" and not tensor.dtype.is_floating_point
        ]
        if not _is_integer_dtype(self.timesteps.dtype):
            problems.append(f"timesteps of dtype {self.timesteps.dtype}, expected an integer dtype")
        elif not bool((self.timesteps[1:] < self.timesteps[:-1]).all()):
            problems.append("timesteps must be strictly descending (the denoising order)")
        return problems

    def _method_problems(self, present: dict[str, torch.Tensor]) -> list[str]:
        optimised = INVERSION_METHODS[self.method].optimises_null_text
        sdxl = "pooled_prompt_embeds" in present
        if optimised and "null_embeds" not in present:
            return [
                "method 'nti' needs null_embeds (NTI's optimised unconditional embedding of each step), which are"
                " missing"
            ]
        stray = [name for name in ("null_embeds", "null_text_losses") if name in present and not optimised]
        if stray:
            return [f"{' and '.join(stray)} belong to method 'nti' only, method is {self.method!r}"]
        if optimised and sdxl and "null_pooled_embeds" not in present:
            return [
                "an SDXL inversion of method 'nti' needs null_pooled_embeds (the pooled embedding of its"
                " unconditional branch), which are missing"
            ]
        if "null_pooled_embeds" in present and not (optimised and sdxl):
            return ["null_pooled_embeds belong to SDXL inversions (with pooled_prompt_embeds) of method 'nti' only"]
        return []

    def _image_size_problems(self, vae_scale_factor: int | None) -> list[str]:
        """``image_size`` is the latent size times the VAE factor; without a pipeline, times one integer factor."""
        if self.latents.dim() != 5:
            return []  # reported as a shape problem
        (height, width), (latent_height, latent_width) = self.image_size, self.latents.shape[-2:]
        factor = vae_scale_factor or (height // latent_height if latent_height else 0)
        if factor and (height, width) == (latent_height * factor, latent_width * factor):
            return []
        times = f"the VAE factor {vae_scale_factor}" if vae_scale_factor else "one integer factor"
        return [f"image_size {list(self.image_size)} is not the latent size {latent_height}x{latent_width} × {times}"]


def _check_entries(path: str, metadata: dict, tensors: dict) -> None:
    """Name missing and unknown entries of a file up front, instead of a bare KeyError or a silently ignored tensor."""
    missing = [key for key in _METADATA_FIELDS if key not in metadata]
    missing += [name for name in _REQUIRED_TENSORS if name not in tensors]
    unknown = sorted(set(metadata) - {"format", *_METADATA_FIELDS}) + sorted(set(tensors) - set(_TENSOR_NAMES))
    problems = [f"missing entries: {', '.join(missing)}"] if missing else []
    problems += [f"unknown entries: {', '.join(unknown)}"] if unknown else []
    if problems:
        raise _invalid(path, problems)


def _invalid(where: str, problems: list[str]) -> InvalidInversionError:
    return InvalidInversionError(f"{where}: invalid inversion ({'; '.join(problems)}).")


# The largest magnitude each tensor of an inversion can hold. A latent times the VAE's scaling factor has unit
# variance by the factor's definition, and DDIM inversion keeps it there (|z| ≲ 10): 10⁴ is beyond anything an
# encoder or an inversion makes. Text embeddings reach a few hundred in CLIP's outlier features; past float16's
# largest value a half-precision UNet would read them as inf. (NTI's losses are NaN after early stopping by design.)
_VALUE_LIMITS = {
    "latents": 1e4,
    "prompt_embeds": 65504.0,
    "null_embeds": 65504.0,
    "pooled_prompt_embeds": 65504.0,
    "null_pooled_embeds": 65504.0,
}


def _value_problems(present: dict[str, torch.Tensor]) -> list[str]:
    """NaN, inf or absurd magnitudes in the tensors the pipeline computes with, named before any model runs."""
    problems = []
    for name, limit in _VALUE_LIMITS.items():
        tensor = present.get(name)
        if tensor is None or not (tensor.dtype.is_floating_point and tensor.numel()):
            continue
        largest = float(tensor.detach().abs().amax())  # NaN if any value is NaN
        if not math.isfinite(largest):
            problems.append(f"{name} contain NaN or inf")
        elif largest > limit:
            problems.append(f"{name} reach {largest:.3g}, beyond the {limit:g} an inversion can hold")
    return problems


def _file_path(path, action: str) -> str:
    """``path`` as a string; a value that cannot name a file raises naming it (``action``: what was attempted)."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"Cannot {action} {path!r}: a path must be a str or os.PathLike.") from None
    if "\0" in path or not path:
        raise ValueError(f"Cannot {action} {path!r}: the path {'is empty' if not path else 'contains a NUL byte'}.")
    return path


def _check_writable(path: str, action: str) -> None:
    """Refuse, before any work, a path that cannot become a file: a folder, a device, a missing or read-only
    folder, a read-only file."""
    if os.path.isdir(path):
        example = os.path.join(path, "inversion.safetensors")
        raise IsADirectoryError(f"{action}: it is a folder; give a file name, such as {example}.")
    if os.path.exists(path) and not os.path.isfile(path):
        raise FileExistsError(f"{action}: it exists and is not a regular file.")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{action}: {folder} is a file, not a folder.")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{action}: no folder {folder}.")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"{action}: the file exists and is read-only.")


# safetensors' own limit on a header; an inversion's is a few kilobytes plus its model signature.
_MAX_HEADER_BYTES = 100_000_000


def _read_inversion_file(path: str) -> tuple[dict, bytes]:
    """The ``__metadata__`` of a safetensors file holding an inversion, and the file's bytes. The header is read
    first: a file that is not an inversion (a model's weights, a device such as /dev/zero) is refused without
    reading the rest."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    if not stat.S_ISREG(mode):  # opening a named pipe would wait for a writer
        raise ValueError("it is not a regular file")
    with open(path, "rb") as file:
        head = file.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or not 0 < length <= _MAX_HEADER_BYTES:
            raise ValueError("it does not start with a safetensors header")
        header = file.read(length)
        metadata = json.loads(header).get("__metadata__") or {}  # a truncated header is a JSON error
        if "inversion" not in metadata:
            raise ValueError("its header holds no inversion metadata")
        return metadata, head + header + file.read()


def _naming_path(error: OSError, message: str) -> OSError:
    """``error`` as the same `OSError` subclass and errno, its message prefixed with ``message`` (which names the
    path): `errno` stays for code that tests it, and the user reads which file and why."""
    return type(error)(error.errno, f"{message}: {error.strerror or error}")


def _write_atomically(path: str, data: bytes, action: str) -> None:
    """Write ``data`` to a new file beside ``path``, then rename it over ``path``: a reader never sees a partial
    file, and a full disk or a crash leaves any earlier file intact. Created like ``open(path, "wb")``, so its
    permissions follow the umask."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
    except OSError as error:
        raise _naming_path(error, action) from error


def _as_inversion_result(value, name: str = "inversion") -> InversionResult:
    """``value`` as this file's `InversionResult`, also when another copy of this file made it.

    diffusers re-executes this file on every ``from_pretrained(..., custom_pipeline=...)`` and so rebinds the class;
    an inversion made before another pipeline was loaded (or made by the pip-installed package) is an instance of an
    equal but distinct class. It is recognised by class name and format marker and re-wrapped (tensors are shared).
    """
    if isinstance(value, InversionResult):
        return value
    cls = type(value)
    if cls.__name__ == InversionResult.__name__ and getattr(cls, "format", None) == INVERSION_FORMAT:
        return InversionResult(**{item.name: getattr(value, item.name) for item in fields(InversionResult)})
    raise TypeError(
        f"{name} must be an InversionResult from pipe.invert() or pipe.load_inversion(), got"
        f" {cls.__module__}.{cls.__qualname__}."
    )


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _fits(shape, pattern: tuple) -> bool:
    return len(shape) == len(pattern) and all(want is None or size == want for size, want in zip(shape, pattern))


def _shape_pattern(pattern: tuple) -> str:
    return "(" + ", ".join("*" if want is None else str(want) for want in pattern) + ")"


# =================================================================================================================
# Output


@dataclass
class NegativePromptInversionPipelineOutput(BaseOutput):
    r"""Output of `NegativePromptInversionPipeline.__call__`.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            One image per (inverted image, target prompt), image-major: all targets of image 0, then of image 1 …
        nsfw_content_detected (`list[bool]`, *optional*): Safety-checker flags, or `None` without a checker.
        edit_masks (`list[PIL.Image.Image]`, *optional*): With proximal guidance and ``return_edit_mask=True``, the
            fraction of steps and channels in which each latent pixel was edited, one grey image per output.
        attention_maps (`list[torch.Tensor]`, *optional*): With ``return_attention_maps=True``, each output's
            average cross-attention maps ``(height, width, tokens)``; see `attention_heat_maps`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None
    edit_masks: list[PIL.Image.Image] | None = None
    attention_maps: list[torch.Tensor] | None = None


# =================================================================================================================
# Editing techniques: small configuration objects. Each owns its settings and their validation (`check`), and
# turns them into this call's attention rules and per-step hook (`prepare`); the pipeline lays out the batch,
# installs the rules and runs the loop. A new attention edit is one such class (plus its rule in a leaf).


@dataclass(frozen=True)
class LocalBlend:
    r"""Prompt-to-prompt's local editing (Hertz et al. 2022, §3.2): outside where the blend words attend, each target
    keeps its source's latent.

    Args:
        words (`tuple` or `list`): One image: ``(source_words, target_words)`` (the target words apply to every
            target) or ``[source_words, target_1_words, …]``; several images: one ``(source_words, target_words)``
            pair per image. Words are a string or a list of strings. Prompts are read as the tokenizer reads them:
            a word matches whatever punctuation surrounds it and whatever its case ("Cat," matches "a cat, on
            grass"), and a string of several words ("t-shirt", "red cat") matches them consecutively.
        threshold (`float`, defaults to 0.3): Threshold on the words' max-normalised attention.
        start (`float`, defaults to 0.2): Fraction of the steps after which blending starts.
        map_level (`int`, *optional*): Which cross-attention maps the mask is read from, as the number of 2×
            downsamplings below the latent (2: ¼ of the latent's side, the references' 16×16 at 512 px). Default:
            ¼ of the latent's side, but no coarser than 16 on the short side (the finest level when none is that
            large): on a small latent, such as the toy model's 32×32, a ¼-side cell spans a whole object and the
            mask spreads far beyond it. ``"finest"``: the finest level that has cross-attention (the latent's own
            on SD 1.x/2.x, half of it on SDXL). ``return_attention_maps`` then returns maps of this level too.
        keep (`bool` or `list[bool]`, defaults to False): The words name what to keep, not what to edit: the target
            is edited everywhere except where its words or its source's attend (the complement of the mask). For
            background edits name every object: a background word attends weakly and unevenly over the
            background, so a blend on it leaves a stain of the old background around each object, while the
            complement of the objects' words recolours the whole background and keeps the objects
            (`LocalBlend.keeping` has the measured settings). One flag per image lets a batch mix object and
            background edits.
        stop (`float`, defaults to 1.0): Fraction of the steps after which blending stops (1: it never stops);
            at least ``start``. The last steps then smooth the blend's seam freely.
    """

    words: tuple | list
    threshold: float = 0.3
    start: float = 0.2
    map_level: int | str | None = None
    keep: bool | list[bool] = False
    stop: float = 1.0

    @classmethod
    def keeping(cls, words: str | list[str] | tuple[str, ...]) -> "LocalBlend":
        """The blend for a background edit: edit everything but what ``words`` cover (the objects, named in both
        prompts), read at the finest cross-attention maps with a low threshold so each object is kept whole, and leave the last
        fifth of the steps unblended to heal the seams. On 100 held-out toy-world background edits (Direct
        Inversion + P2P): 72% reached, 70% objects kept, 26.0 dB unedited, against 70%, 63%, 20.9 dB without a
        blend (``benchmarks/results/toy_v2/di_sweep``)."""
        words = (words,) if isinstance(words, str) else tuple(words)
        return cls((words, words), threshold=0.05, map_level="finest", keep=True, stop=0.8)

    def check(self, layers: list["AttentionLayer"]) -> None:
        problem = _blend_words_problem(self.words)
        if problem:
            raise ValueError(
                "LocalBlend.words must be (source_words, target_words), [source_words, target_1_words, …] or one"
                f" (source_words, target_words) pair per image, each a word or a non-empty list of words; got"
                f" {self.words!r}: {problem}."
            )
        _check_number("LocalBlend.threshold", self.threshold, 0, 1)
        _check_number("LocalBlend.start", self.start, 0, 1)
        _check_number("LocalBlend.stop", self.stop, 0, 1)
        if self.stop < self.start:
            raise ValueError(f"LocalBlend.stop must be at least LocalBlend.start ({self.start}), got {self.stop!r}.")
        flags = self.keep if isinstance(self.keep, (list, tuple)) else [self.keep]
        if not (flags and all(isinstance(flag, (bool, np.bool_)) for flag in flags)):
            raise ValueError(
                f"LocalBlend.keep must be True, False or a list of them (one per image), got {self.keep!r}."
            )
        if isinstance(self.map_level, str) and self.map_level != "finest":
            raise ValueError(
                f"LocalBlend.map_level must be a level (an integer), 'finest' or None, got {self.map_level!r}."
            )
        if self.map_level is not None and self.map_level != "finest":
            levels = sorted({layer.level for layer in layers if layer.cross})
            _check_number("LocalBlend.map_level", self.map_level, 0, max(levels), integer=True)
            _check_choice("LocalBlend.map_level", self.map_level, levels)

    def prepare(self, plan: "EditPlan") -> "_LocalBlendStep":
        words_of = _blend_words_per_branch(plan.branches, self.words, plan.num_images)
        weights = torch.zeros(len(plan.branches), plan.tokenizer.model_max_length)
        for k, (branch, words) in enumerate(zip(plan.branches, words_of)):
            for word in words:
                positions = find_word(branch.prompt, word, plan.tokenizer)
                if not positions:
                    role = "source" if branch.is_source else "target"
                    raise ValueError(
                        f"LocalBlend.words: {word!r} is not a word of the {role} prompt {branch.prompt!r}."
                    )
                weights[k, positions] = 1.0
        keep = self.keep if isinstance(self.keep, (list, tuple)) else [self.keep] * plan.num_images
        if len(keep) != plan.num_images:
            raise ValueError(
                f"LocalBlend.keep has {len(keep)} flags for {plan.num_images} images: give one per image (or one bool)."
            )
        keep = [bool(keep[plan.branches[k].image]) for k in plan.targets]
        return _LocalBlendStep(
            weights.to(plan.device),
            _index(plan.targets, plan.device),
            _index(plan.sources, plan.device),
            self.threshold,
            int(self.start * plan.num_steps),
            torch.tensor(keep, device=plan.device)[:, None, None, None],
            int(self.stop * plan.num_steps),
        )


@dataclass
class _LocalBlendStep:
    """`LocalBlend` for one call: in steps ``start`` to ``stop − 1``, ``z_tgt ← z_src + M·(z_tgt − z_src)`` with M
    where the blend words of the target or of its source attend (for a target that keeps them: where neither's do)."""

    weights: torch.Tensor  # (branches, tokens): 1 on each branch's blend words
    targets: torch.Tensor
    sources: torch.Tensor
    threshold: float
    start: int
    keep: torch.Tensor  # (targets, 1, 1, 1) bool: the words mark what the target keeps
    stop: int

    def __call__(self, latents: torch.Tensor, context: "StepContext") -> torch.Tensor:
        if not self.start <= context.index < self.stop:
            return latents
        mask = local_blend_mask(context.store.average(), self.weights, tuple(latents.shape[-2:]), self.threshold)
        mask = ((mask[self.targets] | mask[self.sources]) ^ self.keep).to(latents.dtype)
        blended = latents[self.sources] + mask * (latents[self.targets] - latents[self.sources])
        return latents.index_copy(0, self.targets, blended)


@dataclass(frozen=True)
class PromptToPrompt:
    r"""Prompt-to-prompt attention control (Hertz et al. 2022) on real images: each target's cross-attention maps
    follow its source's, so the edit keeps the source's layout. The source branch is never changed.

    Args:
        cross_replace_steps (`float`, `tuple` or `dict`, defaults to 0.4): Cross-attention replacement window: a
            fraction f of the steps (``[0, f)``), a ``(start, end)`` pair, or ``{"default_": f, "word": (a, b)}``
            giving target words their own windows (words match as `LocalBlend`'s do).
        self_replace_steps (`float` or `tuple`, defaults to 0.6): Self-attention replacement window (in every
            layer below full latent resolution, the references' "≤ 32²" at 512 px).
        edit_type (`str`, *optional*): ``"replace"`` (word swap, equal word counts) or ``"refine"`` (added or
            removed words); `None` picks per target by word count. Words are the tokenizer's: punctuation is no
            word and any whitespace separates words. PnPInversion's PIE-Bench runs refine every pair.
        reweight (`dict` or `list[dict]`, *optional*): ``{"word": factor}`` scaling target words' attention (one
            dict for every target, or one per target; words match as `LocalBlend`'s do). Factors lie in [−10, 10]
            (`MAX_REWEIGHT`): 1 changes nothing, 2–5 strengthen a word, a negative factor reverses its effect (the
            paper's range is [−2, 2]).
        local_blend (`LocalBlend`, *optional*): Keep the image outside the edited words' attention.
    """

    cross_replace_steps: float | tuple[float, float] | dict = 0.4
    self_replace_steps: float | tuple[float, float] = 0.6
    edit_type: str | None = None
    reweight: dict[str, float] | list[dict[str, float]] | None = None
    local_blend: LocalBlend | None = None

    synthesises = False  # targets keep the inversion's unconditional embedding (ALGORITHMS §5)
    reads_words = True  # needs the prompts as text (`prompt`, not `prompt_embeds`)

    @property
    def needs_attention_maps(self) -> bool:
        return self.local_blend is not None

    @property
    def attention_map_level(self) -> int | None:
        return None if self.local_blend is None else self.local_blend.map_level

    def check(self, num_steps: int, layers: list["AttentionLayer"]) -> None:
        _check_choice("PromptToPrompt.edit_type", self.edit_type, EDIT_TYPES, allow_none=True)
        if self.reweight is not None:
            _check_reweight(self.reweight)
        windows = self.cross_replace_steps
        for window in windows.values() if isinstance(windows, dict) else [windows]:
            check_window("PromptToPrompt.cross_replace_steps", window)
        check_window("PromptToPrompt.self_replace_steps", self.self_replace_steps)
        if self.local_blend is not None:
            self.local_blend.check(layers)

    def prepare(self, plan: "EditPlan"):
        targets, sources, tokenizer, device = plan.targets, plan.sources, plan.tokenizer, plan.device
        weights = _per_target(self.reweight, len(targets), "reweight")
        edits = [self.token_edit(plan.branches[k], w, tokenizer) for k, w in zip(targets, weights)]
        prompts = [plan.branches[k].prompt for k in targets]
        alpha = cross_attention_window(plan.num_steps, prompts, self.cross_replace_steps, tokenizer).to(device)
        window = self_attention_window(plan.num_steps, self.self_replace_steps).to(device)
        cond_rows, source_pos, target_pos = plan.cond_rows, _index(sources, device), _index(targets, device)
        cross = CrossAttentionControl(
            plan.step, cond_rows, source_pos, target_pos, stack_edits(edits).to(device), alpha, plan.store
        )
        self_replace = MutualSelfAttention(
            plan.step, window, cond_rows[source_pos], cond_rows[target_pos], borrow=("query", "key")
        )
        rules = {
            layer.name: cross if layer.cross else self_replace
            for layer in plan.layers
            if layer.cross or layer.level >= 1
        }
        return rules, None if self.local_blend is None else self.local_blend.prepare(plan)

    def token_edit(self, branch: "Branch", weights: dict | None, tokenizer):
        """The edit of one target's cross-attention maps: word swap for equal word counts, else refinement."""
        source, target = branch.source_prompt, branch.prompt
        same_count = len(word_token_indices(source, tokenizer)) == len(word_token_indices(target, tokenizer))
        edit_type = self.edit_type or ("replace" if same_count else "refine")
        edit = (word_swap if edit_type == "replace" else refinement)(source, target, tokenizer)
        return reweighting(edit, target, weights, tokenizer) if weights else edit


@dataclass(frozen=True)
class MasaCtrl:
    r"""Mutual self-attention control (Cao et al. 2023): from ``start_step`` on, in the chosen self-attention layers,
    each target's queries attend to its source's keys and values, so the target keeps the source's appearance while
    its layout or pose follows the target prompt. The target is synthesised with the null embedding as its
    unconditional embedding (ProxMasaCtrl, ALGORITHMS §6).

    Args:
        start_step (`int`, defaults to 4): First controlled step.
        start_layer (`int`, *optional*): First controlled transformer block in call order (the reference values
            are 10 of SD 1.x's 16 blocks and 44 of SDXL's 70). Default: the decoder blocks at the finest attention
            resolution and the next coarser one. On SD 1.x (maps 64² and 32² at 512 px) that is the reference's set;
            on SDXL at 1024 px (no attention at full latent resolution) it is every decoder block at 64² and 32²,
            blocks 34–69, from the start of the 32² decoder stage where the reference starts 10 blocks into it.
    """

    start_step: int = 4
    start_layer: int | None = None

    synthesises = True  # targets are guided against the null embedding (ALGORITHMS §6)
    reads_words = False
    needs_attention_maps = False

    def check(self, num_steps: int, layers: list["AttentionLayer"]) -> None:
        _check_number("MasaCtrl.start_step", self.start_step, 0, num_steps, integer=True)
        if self.start_layer is not None:
            blocks = sum(not layer.cross for layer in layers)
            _check_number("MasaCtrl.start_layer", self.start_layer, 0, blocks - 1, integer=True)

    def prepare(self, plan: "EditPlan"):
        rows = plan.rows
        pairs = [(rows.cond[s], rows.cond[t]) for s, t in zip(plan.sources, plan.targets)]
        pairs += [
            (rows.uncond[s], rows.uncond[t])
            for s, t in zip(plan.sources, plan.targets)
            if rows.uncond[t] != rows.cond[t]
        ]
        window = (torch.arange(plan.num_steps) >= self.start_step).to(plan.device)
        rule = MutualSelfAttention(
            plan.step,
            window,
            _index([s for s, _ in pairs], plan.device),
            _index([t for _, t in pairs], plan.device),
            borrow=("key", "value"),
        )
        finest = min(layer.level for layer in plan.layers)
        if self.start_layer is None:
            chosen = [layer for layer in plan.layers if layer.decoder and layer.level <= finest + 1]
        else:
            chosen = [layer for layer in plan.layers if layer.block >= self.start_layer]
        return {layer.name: rule for layer in chosen if not layer.cross}, None


@dataclass(frozen=True)
class ProximalGuidance:
    r"""Proximal guidance (ProxEdit, Han et al. 2023): threshold the guidance direction ε_c − ε_u of every edited
    sample with a proximal operator, and pull the region it leaves unedited back toward the inversion.

    Args:
        mode (`str`, defaults to `"soft"`): ``"soft"`` (ℓ1 proximal operator) or ``"hard"`` (ℓ0).
        quantile (`float`, defaults to 0.7): λ = this quantile of |ε_c − ε_u|, per edited sample. The reference
            takes one quantile over the whole batch; with the NPI source sample in the batch (its direction is zero)
            its q acts like ``2q − 1`` here (``((k+1)q − 1)/k`` for k targets).
        threshold (`float`, *optional*): A fixed λ instead of the quantile.
        inversion_guidance (`bool`, defaults to True): After each step with t < ``below_timestep``, pull the
            unedited region of the latent toward the inversion trajectory (§3.3).
        reconstruction_guidance (`bool`, defaults to False): The same pull on the predicted x0 toward z_0 (App. B).
        step_size (`float`, defaults to 1.0): Step size η of both pulls, in [0, 1]: the fraction of the way to the
            inversion the unedited region moves per step (0: no pull, 1 pins it there; beyond 1 it would overshoot
            the anchor, and past 2 diverge).
        below_timestep (`int`, defaults to 400): The pulls apply while t < this (0: never).
        mask_dilation (`int`, defaults to 1): Edit-mask dilation radius r (max-pool of 2r+1).
    """

    mode: str = "soft"
    quantile: float = 0.7
    threshold: float | None = None
    inversion_guidance: bool = True
    reconstruction_guidance: bool = False
    step_size: float = 1.0
    below_timestep: int = 400
    mask_dilation: int = 1

    def check(self) -> None:
        _check_choice("ProximalGuidance.mode", self.mode, PROXIMAL_MODES)
        _check_number("ProximalGuidance.quantile", self.quantile, 0, 1)
        if self.threshold is not None:
            _check_number("ProximalGuidance.threshold", self.threshold, 0)
        _check_flag("ProximalGuidance.inversion_guidance", self.inversion_guidance)
        _check_flag("ProximalGuidance.reconstruction_guidance", self.reconstruction_guidance)
        _check_number("ProximalGuidance.step_size", self.step_size, 0, 1)
        _check_number("ProximalGuidance.below_timestep", self.below_timestep, 0)
        _check_number("ProximalGuidance.mask_dilation", self.mask_dilation, 0, integer=True)

    def guide(self, direction: torch.Tensor, noise_cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The thresholded direction of each edited sample and its edit mask M (ProxEdit §3.2–3.3)."""
        direction, threshold = proximal_direction(direction, self.mode, self.quantile, self.threshold)
        # a mask is a discontinuous decision: |prox(d)| within rounding noise of ε_c must never count as edited
        threshold = threshold.maximum(rounding_floor(noise_cond))
        # a radius of the latent's side already spreads any edit over the whole latent; a larger one only costs
        dilation = min(self.mask_dilation, max(direction.shape[-2:]))
        return direction, edit_region(direction, threshold, dilation)

    def pull(self, latents: torch.Tensor, anchor: torch.Tensor, edit_mask: torch.Tensor) -> torch.Tensor:
        """Move the unedited region (1 − M) toward ``anchor``."""
        return guide_towards(latents, anchor, 1 - edit_mask, self.step_size)

    def prepare(self, edited: torch.Tensor, timesteps: list[int], fraction: torch.Tensor) -> "_ProximalStep":
        """This call's per-step rule for the branches at ``edited``; ``timesteps`` on the host, so which steps pull is
        decided before the loop (no per-step sync)."""
        return _ProximalStep(self, edited, [t < self.below_timestep for t in timesteps], fraction)


@dataclass
class _ProximalStep:
    """`ProximalGuidance` for one call. Per step: threshold the edited branches' guidance direction and keep their
    edit mask M in the `StepContext`; pull x0 toward z*_0 (reconstruction guidance) and the new latent toward
    z*_{t−1} (inversion guidance, as a step hook) outside M."""

    settings: ProximalGuidance
    edited: torch.Tensor  # positions of the edited branches
    pulled: list[bool]  # per step: whether t < below_timestep
    fraction: torch.Tensor  # (branches, 1, h, w): sum over steps of the channel-averaged M (0 for unedited branches)

    def threshold(self, direction: torch.Tensor, noise_cond: torch.Tensor, context: "StepContext") -> torch.Tensor:
        thresholded, context.edit_mask = self.settings.guide(direction[self.edited], noise_cond[self.edited])
        self.fraction.index_add_(0, self.edited, context.edit_mask.mean(dim=1, keepdim=True))
        return direction.index_copy(0, self.edited, thresholded)

    def pull_x0(self, x0: torch.Tensor, context: "StepContext") -> torch.Tensor:
        if not (self.settings.reconstruction_guidance and self.pulled[context.index]):
            return x0
        return self._pull(x0, context.origin, context)

    def __call__(self, latents: torch.Tensor, context: "StepContext") -> torch.Tensor:
        if not (self.settings.inversion_guidance and self.pulled[context.index]):
            return latents
        return self._pull(latents, context.anchor, context)

    def _pull(self, latents: torch.Tensor, anchors: torch.Tensor, context: "StepContext") -> torch.Tensor:
        edited = self.edited
        return latents.index_copy(0, edited, self.settings.pull(latents[edited], anchors[edited], context.edit_mask))


ATTENTION_CONTROLS = {"p2p": PromptToPrompt, "masactrl": MasaCtrl}


def _as_attention_control(value):
    """``attention_control`` as a technique object; a name stands for that technique with its defaults."""
    if isinstance(value, str):
        _check_choice("attention_control", value, ATTENTION_CONTROLS)
        return ATTENTION_CONTROLS[value]()
    if value is not None and not all(hasattr(value, name) for name in ("check", "prepare", "synthesises")):
        raise TypeError(
            f"attention_control must be one of {list(ATTENTION_CONTROLS)}, a PromptToPrompt or MasaCtrl object, or"
            f" None; got {type(value).__name__}."
        )
    return value


def _as_proximal_guidance(value, default: str | None):
    """``proximal_guidance`` as a `ProximalGuidance` or None: `None` takes the pipeline's flag, `False` none, and a
    mode name that mode's defaults."""
    value = default if value is None else value
    if value is None or value is False:
        return None
    if isinstance(value, str):
        _check_choice("proximal_guidance", value, PROXIMAL_MODES)
        return ProximalGuidance(mode=value)
    if not all(hasattr(value, name) for name in ("check", "prepare")):
        raise TypeError(
            f"proximal_guidance must be one of {list(PROXIMAL_MODES)}, a ProximalGuidance, False or None; got {value!r}."
        )
    return value


# =================================================================================================================
# Batch layout


@dataclass(frozen=True)
class _GivenEmbedding:
    """A prompt given as a row of an embedding argument (``prompt_embeds``, ``negative_prompt_embeds``), not as text."""

    argument: str
    index: int


@dataclass(frozen=True)
class Branch:
    """One latent being denoised: a source (reconstruction that drives attention control) or a target."""

    image: int
    source_prompt: str
    prompt: str | _GivenEmbedding
    is_source: bool
    uncond: str  # where its unconditional embedding comes from (see InversionMethod)
    controlled: bool
    pinned: bool = False  # on the stored trajectory after every step (Direct Inversion's sources and reconstructions)
    negative: str | _GivenEmbedding = ""  # the prompt of its null embedding (``uncond == "negative"``)
    denoised: bool = True  # False: a pinned reconstruction nothing reads, whose output is z*_0 itself

    @property
    def reconstructs(self) -> bool:
        return self.prompt == self.source_prompt and not self.controlled

    def needs_uncond_row(self, guidance_scale: float) -> bool:
        # At w = 1 the unconditional prediction cancels; and when the unconditional pass would repeat the
        # conditional one (NPI: same latent, same embedding E(src), no control) it is the same computation. A pinned
        # branch's prediction is discarded: only its conditional attention is read (P2P and MasaCtrl read that half).
        same_pass = self.uncond == "source" and self.reconstructs
        return guidance_scale != 1 and not same_pass and not self.pinned


def plan_branches(
    inversion: InversionResult,
    targets: list[list],
    attention_control,
    target_guidance: str | None = None,
    negatives: list | None = None,
    records_maps: bool = False,
) -> list[Branch]:
    """One branch per target, plus a source branch per image when attention control needs the source's attention.

    Unconditional embeddings follow the inversion method (`INVERSION_METHODS`): a target that reconstructs (its
    source prompt, no control) takes the method's ``uncond``; an edited target the one ``target_guidance`` names,
    by default the null embedding for a synthesising control (MasaCtrl) and the method's ``uncond`` otherwise.
    ``negatives``: each target's negative prompt, in output order. Under a pinning method (Direct Inversion) sources
    and reconstructions are pinned, and a reconstruction is not denoised at all unless its maps are recorded.
    """
    method = INVERSION_METHODS[inversion.method]
    controlled = attention_control is not None
    target_guidance = target_guidance or ("null" if controlled and attention_control.synthesises else "inversion")
    edit_uncond = method.null if target_guidance == "null" else method.uncond
    negatives = iter(negatives or itertools.repeat(""))
    branches = []
    for image, (source, prompts) in enumerate(zip(inversion.source_prompts, targets)):
        if controlled:
            branches.append(Branch(image, source, source, True, method.uncond, False, pinned=method.pins_source))
        for prompt in prompts:
            reconstructs = prompt == source and not controlled
            pinned = reconstructs and method.pins_source
            branches.append(
                Branch(
                    image,
                    source,
                    prompt,
                    False,
                    method.uncond if reconstructs else edit_uncond,
                    controlled,
                    pinned=pinned,
                    negative=next(negatives),
                    denoised=records_maps or not pinned,
                )
            )
    return branches


@dataclass(frozen=True)
class RowLayout:
    """The UNet batch rows of a call: unconditional rows first, then one conditional row per branch; a branch whose
    unconditional pass is not needed (or is its conditional one) reads its conditional row for both."""

    cond: tuple[int, ...]  # per branch
    uncond: tuple[int, ...]  # per branch

    @property
    def num_rows(self) -> int:
        return len(set(self.cond) | set(self.uncond))

    def branch_of_row(self) -> list[int]:
        """The branch whose latent each row denoises."""
        owner = [0] * self.num_rows
        for k, (cond, uncond) in enumerate(zip(self.cond, self.uncond)):
            owner[cond] = owner[uncond] = k
        return owner

    def index(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device indices: the branch of each row, each branch's conditional row, its unconditional row."""
        return tuple(_index(rows, device) for rows in (self.branch_of_row(), self.cond, self.uncond))


def lay_out_rows(branches: list[Branch], guidance_scale: float) -> RowLayout:
    separate = [k for k, branch in enumerate(branches) if branch.needs_uncond_row(guidance_scale)]
    cond = tuple(range(len(separate), len(separate) + len(branches)))
    uncond = {k: row for row, k in enumerate(separate)}
    return RowLayout(cond=cond, uncond=tuple(uncond.get(k, cond[k]) for k in range(len(branches))))


def _output_rows(branches: list[Branch]) -> list[int]:
    """Where each target's final latent lies in ``cat(denoised branches' latents, z*_0 of each image)``, in output
    order: a reconstruction that was never denoised (`Branch.denoised`) is its image's z*_0."""
    denoised = list(itertools.accumulate(branch.denoised for branch in branches))
    return [
        denoised[k] - 1 if branch.denoised else denoised[-1] + branch.image
        for k, branch in enumerate(branches)
        if not branch.is_source
    ]


@dataclass
class StepContext:
    """What the per-step rules of one call read, the one protocol of step hooks (`_PinSources`,
    `_ProximalStep`, `_LocalBlendStep`: ``hook(latents, context) -> latents`` after each DDIM step). One object per
    call, updated before each step; everything in it is on the device or decided on the host before the loop."""

    trajectory: torch.Tensor  # (branches, N + 1, C, h, w): the inversion latents z*_0 … z*_T of each branch's image
    store: AttentionStore | None  # the cross-attention maps recorded so far (local blend reads them)
    index: int = 0  # the step, from timesteps[index] down to the next timestep
    edit_mask: torch.Tensor | None = None  # proximal guidance's M of its edited branches at this step

    @property
    def anchor(self) -> torch.Tensor:
        """z*_{t−1}: where this step lands on the trajectory."""
        return self.trajectory[:, self.trajectory.shape[1] - 2 - self.index]

    @property
    def origin(self) -> torch.Tensor:
        """z*_0: the encoded images."""
        return self.trajectory[:, 0]


@dataclass
class _PinSources:
    """The inversion method's step rule (`InversionMethod.pins_source`, Direct Inversion): after every step the
    pinned branches are exactly the trajectory's next latent."""

    pinned: torch.Tensor  # positions of the pinned branches

    def __call__(self, latents: torch.Tensor, context: StepContext) -> torch.Tensor:
        return pin_to_trajectory(latents, context.anchor, self.pinned)


# =================================================================================================================
# One denoising step of an edit: the guided prediction, the DDIM step, the step hooks and the user's callback


def _guided_noise(noise_cond, noise_uncond, guidance_scale, guidance_rescale, proximal, context) -> torch.Tensor:
    """Each branch's guided prediction ε̃ = ε_u + w·d, d = ε_c − ε_u thresholded by proximal guidance if on."""
    direction = noise_cond - noise_uncond
    if proximal is not None:
        direction = proximal.threshold(direction, noise_cond, context)
    noise = classifier_free_guidance(noise_uncond, direction, guidance_scale)
    if guidance_rescale > 0:
        noise = rescale_guidance(noise, noise_cond, guidance_rescale)
    return noise


def _denoising_step(latents, noise, alpha, alpha_next, proximal, context) -> torch.Tensor:
    """DDIM from ᾱ to ᾱ_next through x0, which proximal guidance's reconstruction guidance may pull toward z*_0."""
    x0 = predict_x0(latents, noise, alpha)
    if proximal is not None:
        x0 = proximal.pull_x0(x0, context)
    return renoise(x0, noise, alpha_next)


def _step_hooks(branches: list[Branch], proximal: "_ProximalStep | None", control: "_Control", device) -> list:
    """What runs after each DDIM step, in order: proximal guidance's inversion guidance, the inversion method's pin
    (Direct Inversion; last of the rules that move latents, so pinned branches are the trajectory whatever else
    ran), the attention control's hooks (local blend, which thus blends toward the pinned source)."""
    pinned = [k for k, branch in enumerate(branches) if branch.pinned]
    hooks = [proximal] if proximal is not None else []
    return hooks + ([_PinSources(_index(pinned, device))] if pinned else []) + control.hooks


class _StepCallback:
    """``callback_on_step_end`` of one call, checked: it must return a dict whose ``latents``, if they replace the
    pipeline's, match them in shape, dtype and device. Whether replaced latents are finite is recorded on the device
    and checked once after the loop (`check_finite`; no per-step sync), so NaN or inf from a callback is reported as
    the callback's, not as an overflow of the model."""

    def __init__(self, pipe, callback, tensor_inputs: list[str], num_steps: int):
        self.pipe, self.callback, self.tensor_inputs, self.num_steps = pipe, callback, tensor_inputs, num_steps
        self.not_finite = None  # (steps,) bool on the device, from the first replacement on

    def __call__(self, step: int, timestep, latents: torch.Tensor, context: StepContext) -> torch.Tensor:
        if self.callback is None:
            return latents
        tensors = {"latents": latents, "edit_mask": context.edit_mask}
        outputs = self.callback(self.pipe, step, timestep, {name: tensors[name] for name in self.tensor_inputs})
        if not isinstance(outputs, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict (the tensors it was given, changed or not; {{}} for none),"
                f" got {type(outputs).__name__} at step {step}."
            )
        returned = outputs.get("latents", latents)
        if returned is latents:
            return latents
        if not (
            isinstance(returned, torch.Tensor)
            and (returned.shape, returned.dtype, returned.device) == (latents.shape, latents.dtype, latents.device)
        ):
            raise ValueError(
                f"callback_on_step_end returned latents {_describe(returned)} at step {step}; they must be"
                f" {_describe(latents)}, as the latents it was given."
            )
        if self.not_finite is None:
            self.not_finite = torch.zeros(self.num_steps, dtype=torch.bool, device=latents.device)
        self.not_finite[step] = ~torch.isfinite(returned).all()
        return returned

    def check_finite(self) -> None:
        if self.not_finite is not None and bool(self.not_finite.any()):
            step = int(self.not_finite.nonzero()[0])
            raise ValueError(f"callback_on_step_end returned latents with NaN or inf values at step {step}.")


def _describe(value) -> str:
    if not isinstance(value, torch.Tensor):
        return f"of type {type(value).__name__}"
    return f"of shape {tuple(value.shape)}, {value.dtype}, on {value.device}"


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer of the UNet, in call order, for a given latent size."""

    name: str  # its key in ``unet.attn_processors``
    cross: bool  # cross-attention (attn2) rather than self-attention (attn1)
    decoder: bool  # in the up blocks
    level: int  # number of 2× downsamplings above it
    size: tuple[int, int]  # its attention map's (height, width)
    block: int  # index of its transformer block among all, in call order


@dataclass
class EditPlan:
    """What an attention control reads to build one call's rules."""

    branches: list[Branch]
    rows: RowLayout
    layers: list[AttentionLayer]
    num_steps: int
    step: torch.Tensor  # 0-dim device step index every rule reads its per-step switches with
    store: AttentionStore | None
    tokenizer: CLIPTokenizer
    device: torch.device

    @property
    def num_images(self) -> int:
        return 1 + max(branch.image for branch in self.branches)

    @property
    def targets(self) -> list[int]:
        return [k for k, branch in enumerate(self.branches) if not branch.is_source]

    @property
    def sources(self) -> list[int]:
        """The source branch of each target (the target itself when its image has none)."""
        source_of = {branch.image: k for k, branch in enumerate(self.branches) if branch.is_source}
        return [source_of.get(self.branches[k].image, k) for k in self.targets]

    @property
    def cond_rows(self) -> torch.Tensor:
        return _index(self.rows.cond, self.device)


@dataclass
class _Control:
    """One call's attention control. ``processors`` (by layer name), ``step`` and ``store`` are what the UNet reads,
    so captured graphs hold on to them; ``hooks`` run after each denoising step (local blend)."""

    processors: dict = field(default_factory=dict)
    step: torch.Tensor | None = None
    store: AttentionStore | None = None
    hooks: list = field(default_factory=list)

    def state(self) -> tuple[tuple, list[torch.Tensor]]:
        """``(structure, tensors)`` from each rule's explicit `structure()` and `tensors()`: two controls of equal
        structure compute the same way and differ only in their tensors' values."""
        rules = list({id(processor.rule): processor.rule for processor in self.processors.values()}.values())
        position = {id(rule): k for k, rule in enumerate(rules)}
        layout = tuple((name, position[id(processor.rule)]) for name, processor in self.processors.items())
        step = [] if self.step is None else [self.step]
        tensors = [*step, *(tensor for rule in rules for tensor in rule.tensors())]
        specs = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)
        return (layout, tuple(rule.structure() for rule in rules), specs), tensors


@dataclass
class UNetCallLog:
    """What `NegativePromptInversionPipeline.count_unet_calls` saw: each UNet evaluation's ``(batch size, with
    gradient)``, and how many of them captured a CUDA graph (an eager warm-up, a capture, and a replay)."""

    calls: list[tuple[int, bool]] = field(default_factory=list)
    captures: int = 0


def _unet_forward(unet, inputs: dict) -> torch.Tensor:
    """The UNet's output for ``inputs``: latents, timestep, embeds and, on SDXL, ``text_embeds`` and ``time_ids``."""
    added = {name: inputs[name] for name in ("text_embeds", "time_ids") if name in inputs}
    return unet(
        inputs["latents"],
        inputs["timestep"],
        encoder_hidden_states=inputs["embeds"],
        added_cond_kwargs=added or None,
        return_dict=False,
    )[0]


class _CUDAGraphUNet:
    """The UNet forward replayed as CUDA graphs, kept across calls (optionally compiled first).

    One graph per input shape, attention-control structure and model state, captured right after an eager call
    that computes that step for real. Rules read their per-step switches from device tensors, so one graph serves
    every step. Graphs read the control's tensors in place: a later call whose control has the same structure
    therefore gets the earlier control objects back with its own values copied in (`adopt`), and replays the same
    graphs; nothing is recaptured or recompiled. Non-CUDA inputs run eagerly.

    ``compile``: ``False``; ``True`` / ``"whole"`` (the whole UNet as one inductor graph); ``"regional"`` (each block
    of `regional_blocks` compiled on its own, so blocks of one class and shape share one compiled graph). Regional
    code runs only while this runner warms up and captures a graph: every other caller of the UNet (NTI's gradient
    passes, CPU inputs, other pipelines sharing it) keeps the eager UNet.
    """

    max_graphs = 8  # least recently used graphs beyond this are released
    # diffusers' own `_repeated_blocks` of UNet2DConditionModel (its transformer blocks) plus the resnets and the
    # resamplers between them, whose normalisation and activations inductor fuses like the whole-model compile does.
    regional_blocks = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")
    regional_dynamic = False  # static shapes: one kernel set per block shape, as the whole-model compile

    def __init__(self, unet, compile: bool | str = False):
        self.unet, self.compile = unet, compile
        # dynamic=False: one static kernel set per batch size instead of a slower dynamic-shape one
        self.forward = torch.compile(unet, dynamic=False) if compile in (True, "whole") else unet
        self.regions = self._compile_regions(unet) if compile == "regional" else {}
        self.graphs = OrderedDict()
        self.captures = 0
        self.controls = {}  # structure -> (control, its tensors)
        self.key = None

    def _compile_regions(self, unet) -> dict:
        """Block -> its compiled call, as ``nn.Module.compile`` would install it (torch.compile is lazy: nothing
        compiles before the first capture)."""
        names = set(self.regional_blocks) | set(getattr(unet, "_repeated_blocks", None) or ())
        blocks = [module for module in unet.modules() if type(module).__name__ in names]
        # Every shape of a block class is one cache entry of its forward (SD 1.5: ~24 per batch size, against
        # dynamo's default limit of 8, past which it would silently run the block eagerly).
        config = torch._dynamo.config
        for name in ("recompile_limit", "accumulated_recompile_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 1024))
        return {block: torch.compile(block._call_impl, dynamic=self.regional_dynamic) for block in blocks}

    @contextmanager
    def _compiled_regions(self):
        """Route the regional blocks through their compiled calls for the duration (replays need no Python)."""
        saved = {block: block._compiled_call_impl for block in self.regions}
        for block, compiled in self.regions.items():
            block._compiled_call_impl = compiled
        try:
            yield
        finally:
            for block, previous in saved.items():
                block._compiled_call_impl = previous

    def adopt(self, control: _Control) -> _Control:
        """The control to install: the first one seen with this structure, holding ``control``'s values."""
        structure, tensors = control.state()
        kept, kept_tensors = self.controls.setdefault(structure, (control, tensors))
        if kept is not control:
            for mine, theirs in zip(kept_tensors, tensors):
                mine.copy_(theirs)
            kept.hooks = control.hooks
        return kept

    def refresh_key(self) -> None:
        """Key the next graphs on the installed processors and the weights' storage (a moved, cast, re-adapted or
        quantised UNet must not replay graphs that read the old tensors)."""
        processors = tuple(id(processor) for processor in self.unet.attn_processors.values())
        self.key = (processors, tuple(_storage_pointers(parameter) for parameter in self.unet.parameters()))

    def __call__(self, latents, timestep, embeds, added_cond: dict | None = None):
        inputs = {"latents": latents, "timestep": timestep, "embeds": embeds, **(added_cond or {})}
        if not latents.is_cuda:
            return _unet_forward(self.unet, inputs)
        # every input is a graph input: SDXL's pooled embeddings and time ids change between calls like the text
        key = (self.key, latents.dtype, *((name, tuple(tensor.shape)) for name, tensor in inputs.items()))
        if key in self.graphs:
            self.graphs.move_to_end(key)
            graph, static = self.graphs[key]
            for name, tensor in inputs.items():
                static[name].copy_(tensor)
            graph.replay()
            return static["output"].clone()
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with self._compiled_regions():
            with torch.cuda.stream(side):
                output = _unet_forward(self.forward, static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static["output"] = _unet_forward(self.forward, static)
        self.graphs[key] = (graph, static)
        self.captures += 1
        if len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return output


def _is_quantized(weight: torch.Tensor) -> bool:
    """A weight that torchao replaced by a tensor subclass (plain weights are ``Parameter`` or ``Tensor``)."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


# Why CUDA graphs and FP8 are not combined (`enable_cuda_graphs`, `enable_fp8`): a wrong image must not come silently.
_FP8_GRAPHS = (
    "CUDA graphs over an FP8 UNet are not supported yet: on an H200, regionally compiled FP8 graphs did not reproduce"
    " eager FP8 edits (tests/test_fast_paths.py)"
)


def _storage_pointers(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where a tensor's data lives; for a tensor subclass (torchao's FP8 weights), where its inner tensors' do."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return tuple(pointer for name in names for pointer in _storage_pointers(getattr(tensor, name)))
    return (tensor.data_ptr(),)


# =================================================================================================================
# The pipeline


@dataclass
class _CallLock:
    """A UNet's call lock and the thread inside it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: int | None = None


_UNET_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, _CallLock]" = weakref.WeakKeyDictionary()
_UNET_LOCKS_GUARD = threading.Lock()


def _one_call_at_a_time(method):
    """Serialise ``method`` per UNet. A call installs its attention processors on the UNet and keeps per-call state
    on the pipeline, so two threads inside one pipeline, or in two pipelines sharing a UNet (``from_pipe``), would
    denoise with each other's processors. A call from inside a running one (from its ``callback_on_step_end``) would
    do the same to the running call in one thread, so it is refused. (The lock lives beside the UNet, so pipelines
    stay deep-copyable.)"""

    @functools.wraps(method)
    def serialized(self, *args, **kwargs):
        with _UNET_LOCKS_GUARD:
            guard = _UNET_LOCKS.setdefault(self.unet, _CallLock())
        if guard.owner == threading.get_ident():
            name = "the pipeline" if method.__name__ == "__call__" else f"{method.__name__}()"
            raise RuntimeError(
                f"Cannot run {name} inside a running call of a pipeline that shares its UNet (from its"
                " callback_on_step_end?): the running call's attention processors are installed on that UNet. Keep"
                " what you need from the callback and call the pipeline after the running call returns."
            )
        with guard.lock:
            guard.owner = threading.get_ident()
            try:
                return method(self, *args, **kwargs)
            finally:
                guard.owner = None

    return serialized


class NegativePromptInversionPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    FromSingleFileMixin,
):
    r"""Invert real images with Direct, negative-prompt, null-text or DDIM inversion, then reconstruct or edit them.

    Constructor flags are stored in the pipeline config (they survive `save_pretrained` / `from_pretrained` and can
    be passed to `from_pretrained`); `invert` and `__call__` accept per-call overrides.

    The public API, beside `DiffusionPipeline`'s (`from_pretrained`, `save_pretrained`, `from_pipe`, offloading,
    LoRA and textual-inversion loading):

    - `invert` → `InversionResult` (`.save`, `load_inversion`), then `__call__` to reconstruct or edit;
    - the editing techniques `PromptToPrompt`, `LocalBlend`, `MasaCtrl`, `ProximalGuidance`;
    - `check_inputs` and `check_inversion` (validate without running a model), `encode_text` (embeddings for
      ``prompt_embeds``), `encode_images` / `decode_latents` (the VAE at the pipeline's scaling);
    - `enable_cuda_graphs` / `disable_cuda_graphs`, `enable_fp8`, `to`; `count_unet_calls` (what a call costs);
      `attention_heat_maps` (draw ``return_attention_maps``); `is_sdxl`; diffusers' `guidance_scale`,
      `num_timesteps`, `interrupt` and `run_safety_checker`.

    Names with a leading underscore are internal and may change without notice.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor:
            The Stable Diffusion components. Any scheduler works: its noise schedule is used through a DDIM
            scheduler built from its config (DDIM is the deterministic sampler every inversion method assumes).
        text_encoder_2 (`CLIPTextModelWithProjection`, *optional*), tokenizer_2 (`CLIPTokenizer`, *optional*):
            SDXL's second text encoder and its tokenizer; required by a UNet with SDXL's added conditioning
            (``addition_embed_type="text_time"``), absent for SD 1.x/2.x.
        inversion_method (`str`, defaults to `"direct"`): ``"direct"`` (Direct Inversion), ``"npi"``, ``"nti"`` or
            ``"ddim"``: how `invert` inverts; edits follow the inversion's method unless the call overrides it. Direct
            Inversion is the default because it measured best: on the toy PIE-Bench benchmark DI+P2P keeps 2.7 dB
            more of the unedited image than NPI+P2P and reaches the target 7 points more often (`docs/results.md`).
        null_text_inner_steps (`int`, defaults to 10): NTI optimisation steps per timestep.
        null_text_early_stop (`float`, defaults to 1e-5): NTI stops a timestep once its loss falls below
            ``early_stop + 2e-5·i`` (i = step index), as the reference.
        null_text_init (`str`, defaults to `"prompt"`): initialise NTI from E(source) (``"prompt"``: starts at the
            NPI solution; on the toy model it reconstructs slightly better than ``"null"`` with 2.6× fewer inner
            steps, and on SD 1.5 it inverts in 5.6 s instead of 42 s on an H100) or from E("") (``"null"``, the
            paper's choice).
        proximal_guidance (`str`, *optional*): ``"soft"`` or ``"hard"`` thresholding of the guidance direction
            (ProxEdit); `None` for plain guidance.
        force_zeros_for_empty_prompt (`bool`, defaults to True): SDXL only, as in diffusers' SDXL pipeline: the
            null embedding E("") (DDIM's and Direct Inversion's unconditional embedding, MasaCtrl's targets under
            NPI, NTI's ``"null"`` initialisation) is all zeros, sequence and pooled, unless a call gives a
            ``negative_prompt``. SD 1.x/2.x always encode the empty prompt.
    """

    # The editing techniques, reachable from any loaded pipeline as ``pipe.PromptToPrompt(...)``: a file loaded by
    # diffusers as a custom pipeline offers no module to import them from.
    PromptToPrompt, MasaCtrl, LocalBlend, ProximalGuidance = PromptToPrompt, MasaCtrl, LocalBlend, ProximalGuidance

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "text_encoder_2", "tokenizer_2"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "edit_mask"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        inversion_method: str = "direct",
        null_text_inner_steps: int = 10,
        null_text_early_stop: float = 1e-5,
        null_text_init: str = "prompt",
        proximal_guidance: str | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        safety_checker = _optional_component("safety_checker", safety_checker)
        feature_extractor = _optional_component("feature_extractor", feature_extractor)
        text_encoder_2 = _optional_component("text_encoder_2", text_encoder_2)
        tokenizer_2 = _optional_component("tokenizer_2", tokenizer_2)
        _check_choice("inversion_method", inversion_method, INVERSION_METHODS)
        _check_null_text_settings(null_text_inner_steps, null_text_early_stop, null_text_init)
        _check_choice("proximal_guidance", proximal_guidance, PROXIMAL_MODES, allow_none=True)
        _check_flag("force_zeros_for_empty_prompt", force_zeros_for_empty_prompt)
        if scheduler is None:
            raise ValueError("scheduler is required: inversion runs on its noise schedule (any diffusers scheduler).")
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("A safety_checker needs a feature_extractor; pass safety_checker=None to disable it.")
        _check_sdxl_components(unet, tokenizer, text_encoder_2, tokenizer_2)
        if not isinstance(scheduler, DDIMScheduler):
            logger.warning(
                f"{type(scheduler).__name__} is not deterministic DDIM, which inversion requires; this pipeline"
                " samples with a DDIMScheduler built from its config (same noise schedule)."
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.register_to_config(
            inversion_method=inversion_method,
            null_text_inner_steps=null_text_inner_steps,
            null_text_early_stop=null_text_early_stop,
            null_text_init=null_text_init,
            proximal_guidance=proximal_guidance,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._cuda_graphs: _CUDAGraphUNet | None = None  # see enable_cuda_graphs
        self._unet_call_logs: dict[int, list[UNetCallLog]] = {}  # see count_unet_calls

    # -------------------------------------------------------------------------------------------------------------
    # Properties read by callbacks, as in the core pipelines

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    def to(self, *args, **kwargs):
        """`DiffusionPipeline.to`, but a device the pipeline cannot run on is refused before anything moves, naming
        it: the meta device (tensors without values), a backend this build of torch lacks (``"cuda"`` on a CPU
        build), an unavailable backend, or a device index beyond those present."""
        devices = [kwargs["device"]] if kwargs.get("device") is not None else []
        devices += [arg for arg in args if isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool)]
        for device in devices:
            _check_device(device)
        return super().to(*args, **kwargs)

    # -------------------------------------------------------------------------------------------------------------
    # Building blocks

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet reads SDXL's added conditioning: text_encoder_2's pooled embedding and the time ids."""
        return getattr(self, "text_encoder_2", None) is not None

    def encode_text(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """E(p) for each prompt over 77 padded tokens, and the pooled embedding (`None` unless SDXL).

        SD 1.x/2.x: the text encoder's last hidden state. SDXL (as diffusers' SDXL pipeline): the penultimate hidden
        states of both encoders concatenated per token (768 + 1280 = 2048 features), and text_encoder_2's pooled
        projection. Both tokenizers place every token at the same position (`_token_ids` checks it), so
        prompt-to-prompt's token positions hold for both halves of the embedding.
        """
        if not self.is_sdxl:
            embeds = self._run_text_encoder(self.text_encoder, self.tokenizer, prompts, device)[0]
            return embeds.to(dtype=self.unet.dtype, device=device), None
        first, second = (
            self._run_text_encoder(encoder, tokenizer, prompts, device, output_hidden_states=True)
            for encoder, tokenizer in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2))
        )
        embeds = torch.cat([first.hidden_states[-2].to(device), second.hidden_states[-2].to(device)], dim=-1)
        return embeds.to(dtype=self.unet.dtype), second.text_embeds.to(dtype=self.unet.dtype, device=device)

    def _run_text_encoder(self, text_encoder, tokenizer, prompts: list[str], device, **kwargs):
        if isinstance(self, TextualInversionLoaderMixin):
            prompts = self.maybe_convert_prompt(prompts, tokenizer)
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask, **kwargs)

    def _null_embedding(self, empty: tuple[torch.Tensor, torch.Tensor | None]):
        """The null embedding from E("") (``encode_text`` output): zeros on SDXL with ``force_zeros_for_empty_prompt``,
        the unconditional embedding SDXL was trained with for dropped captions (as diffusers' SDXL pipeline)."""
        if self.is_sdxl and self.config.force_zeros_for_empty_prompt:
            return tuple(torch.zeros_like(tensor) for tensor in empty)
        return empty

    def _token_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids without BOS / EOS, untruncated.

        On SDXL both tokenizers must split the prompt alike (they share CLIP's BPE vocabulary; only their padding
        differs, EOS versus "!"): prompt-to-prompt edits, refinement alignment and the truncation checks all use
        the first tokenizer's positions for the concatenated embedding of both encoders. The pieces' text is
        compared, not their ids: tokenizer_2 reads a typed "!" as its padding token, the same piece at the same
        position under another id.
        """
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        if self.is_sdxl and _piece_texts(self.tokenizer_2, prompt) != _piece_texts(self.tokenizer, prompt):
            raise ValueError(
                f"tokenizer and tokenizer_2 split {prompt!r} into different tokens; prompt-to-prompt needs SDXL's pair"
                " of tokenizers with one BPE vocabulary."
            )
        return ids

    def _warn_truncated_prompts(self, prompts: list[str]) -> None:
        """Name the words the text encoder never sees: it reads ``model_max_length`` tokens, BOS and EOS included."""
        limit = self.tokenizer.model_max_length - 2
        for prompt in dict.fromkeys(prompts):
            ids = self._token_ids(prompt)
            if len(ids) > limit:
                logger.warning(
                    f"prompt {prompt!r} is longer than the text encoder's {limit + 2} tokens; these words are ignored:"
                    f" {self.tokenizer.decode(ids[limit:])!r}."
                )

    def _check_target_prompts(self, targets: list[list[str]], sources: list[str]) -> None:
        """Warn about truncated targets; refuse a target whose change the truncation would drop entirely."""
        limit = self.tokenizer.model_max_length - 2
        self._warn_truncated_prompts([prompt for prompts in targets for prompt in prompts])
        for source, prompts in zip(sources, targets):
            for prompt in prompts:
                if prompt != source and self._token_ids(prompt)[:limit] == self._token_ids(source)[:limit]:
                    raise ValueError(
                        f"prompt {prompt!r} differs from its source prompt only past the text encoder's {limit + 2}"
                        " tokens, so the edit would return the reconstruction; shorten the prompts."
                    )

    def _encode_unique(self, prompts: list[str], device) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each distinct prompt's ``(embedding, pooled embedding)`` from one text-encoder batch."""
        unique = list(dict.fromkeys(prompts))
        if not unique:
            return {}
        embeds, pooled = self.encode_text(unique, device)
        return {prompt: (embeds[k], _row(pooled, k)) for k, prompt in enumerate(unique)}

    def _prepare_images(self, image, height: int | None, width: int | None, resize_mode: str) -> torch.Tensor:
        """Images → ``(batch, 3, height, width)`` in [-1, 1].

        Accepts PIL images, image files' paths, numpy arrays (HWC / NHWC, uint8, uint16 or float in [0, 1]) and
        tensors (CHW / NCHW in [0, 1]), one or a list; PIL images and files are read as `diffusers.utils.load_image`
        reads them (EXIF orientation applied) but keep 16 bits, and transparency is composited over white. The output
        size defaults to the model's native square size; both sides must be multiples of the VAE factor (8 for
        Stable Diffusion). ``resize_mode="crop"`` (default, the reference preprocessing) centre-crops the output's
        aspect ratio and resizes that; ``"stretch"`` resizes without keeping the aspect ratio.
        """
        native = self.unet.config.sample_size * self.vae_scale_factor
        native_h, native_w = (native, native) if isinstance(native, int) else native
        height = native_h if height is None else height
        width = native_w if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_scale_factor}, got {value!r}.")
        _check_choice("resize_mode", resize_mode, ("crop", "stretch"))
        images = [_image_to_tensor(item) for item in _as_image_list(image)]
        return torch.cat([_resize(item, height, width, resize_mode) for item in images]) * 2 - 1

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """z_0 = E(x): the posterior *mean* times the VAE scaling factor (ALGORITHMS §0), float32. A deterministic
        encoder (``AutoencoderTiny``) has no posterior; its output is the latent."""
        device = self._execution_device
        with self._vae_precision():
            encoded = self.vae.encode(images.to(device=device, dtype=self.vae.dtype))
        posterior = getattr(encoded, "latent_dist", None)
        latents = (encoded.latents if posterior is None else posterior.mean).float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        with self._vae_precision():
            return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    @contextmanager
    def _vae_precision(self):
        """Run SDXL's VAE in float32 when it is float16 and its config says ``force_upcast``, as diffusers' SDXL
        pipelines: its activations overflow float16 (inf, then NaN images). The fp16-fixed VAE
        (madebyollin/sdxl-vae-fp16-fix, ``force_upcast=False``) stays in float16, faster and smaller.
        SD 1.x/2.x VAEs run in their own dtype (they do not overflow)."""
        dtype = self.vae.dtype
        upcast = self.is_sdxl and dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=dtype)

    def _ddim_schedule(self, num_inference_steps: int, device):
        """Timesteps (descending) and ᾱ before and after each denoising step.

        The step after ``timesteps[i]`` lands on ``timesteps[i + 1]`` and the last one on the scheduler's
        ``final_alpha_cumprod`` (ᾱ_0 for Stable Diffusion's ``set_alpha_to_one=False``). With the usual
        "leading" spacing this is DDIM's ``t − T/N``.
        """
        scheduler = self.scheduler
        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        alphas = scheduler.alphas_cumprod.to(device)[timesteps]
        final = scheduler.final_alpha_cumprod.to(device=device, dtype=alphas.dtype)
        return timesteps, alphas, torch.cat([alphas[1:], final[None]])

    def enable_cuda_graphs(self, compile: bool | str = False) -> None:
        """Replay the UNet as CUDA graphs inside `invert` and `__call__` (CUDA only; off by default).

        The stock UNet is launch-bound on fast GPUs; a replayed graph removes the per-kernel launch cost. Graphs are
        kept across calls (up to 8, least recently used released first): the first call with a new batch size or
        kind of attention control captures one after an eager step, later calls replay it. Attention control stays
        exact because its per-step switches live in device tensors. NTI's gradient passes always run eagerly.

        Args:
            compile (`bool` or `str`, defaults to False): Also compile the UNet with `torch.compile` (inductor, static
                shapes) before capturing. ``True`` or ``"whole"``: the whole UNet as one graph; its first call per
                batch size and kind of control compiles for about 1–1.5 min, after which each UNet step takes ~45%
                less time (H100). ``"regional"``: each repeated block (transformer blocks, resnets, resamplers)
                compiled on its own, so blocks of one class and shape share one compiled graph (fewer distinct
                graphs to trace; the same fusions inside each block), and only while graphs are captured: the UNet
                stays eager for every other caller. It raises dynamo's recompile limit, since each block shape is
                one cache entry of its class. A channels-last UNet
                (``pipe.unet.to(memory_format=torch.channels_last)``) is faster still. Compiled code is cached on
                disk by inductor (``TORCHINDUCTOR_CACHE_DIR``, default a folder under the system's temporary
                directory), so a new process compiling the same shapes mostly loads it; point the variable at a
                persistent folder to keep that across reboots.
        """
        if compile not in (False, True, "whole", "regional"):
            raise ValueError(f"compile must be False, True (or 'whole') or 'regional', got {compile!r}.")
        if any(_is_quantized(parameter) for parameter in self.unet.parameters()):
            raise NotImplementedError(
                f"enable_cuda_graphs(): {_FP8_GRAPHS}. Run the FP8 UNet eagerly, or reload it in bfloat16."
            )
        self._cuda_graphs = _CUDAGraphUNet(self.unet, compile)

    def enable_fp8(self) -> int:
        """Run the UNet's linear layers in FP8 on Ada / Hopper GPUs (compute capability 8.9 or newer). Opt-in.

        Applies torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (the quantisation
        library diffusers documents): weights are stored in ``float8_e4m3fn`` with one scale per output row, and each
        activation is quantised per row on the fly, so the matrix products run on the FP8 tensor cores.
        Convolutions and attention stay in bfloat16; torchao leaves linear layers whose input or output width is
        not a multiple of 16 as they are.

        Not yet a speed-up: CUDA graphs over an FP8 UNet are refused, because on an H200 (2026-12-03) regionally
        compiled FP8 graphs did not reproduce eager FP8 edits (``tests/test_fast_paths.py``), and eager FP8 ran the
        toy benchmark 2.3–3.4× slower than eager bfloat16 at the same quality (within 0.1 dB;
        ``benchmarks/results/speed_session/fp8_toy``).

        Irreversible on this UNet (its weights are replaced): reload the UNet to go back to bfloat16. Inductor's
        global settings are left alone (``set_inductor_config=False``).

        Returns:
            `int`: the number of linear layers now running in FP8.
        """
        device = self.unet.device
        if device.type != "cuda":
            raise RuntimeError(f"enable_fp8() needs the UNet on a CUDA GPU with FP8 tensor cores; it is on {device}.")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise RuntimeError(
                f"enable_fp8() needs compute capability 8.9 or newer (Ada, Hopper); {torch.cuda.get_device_name(device)}"
                f" has {capability[0]}.{capability[1]}."
            )
        if self._cuda_graphs is not None:
            raise NotImplementedError(f"enable_fp8(): {_FP8_GRAPHS}. Call pipe.disable_cuda_graphs() first.")
        if self.unet.dtype != torch.bfloat16:
            raise ValueError(
                f"enable_fp8() needs a bfloat16 UNet (per-row FP8 scales are taken from bfloat16 weights); it is "
                f"{self.unet.dtype}: load it with torch_dtype=torch.bfloat16 or call pipe.unet.to(torch.bfloat16)."
            )
        try:  # imported by name: diffusers asks to install every package a custom pipeline imports by statement
            quantization = importlib.import_module("torchao.quantization")
        except ImportError as error:
            raise ImportError("enable_fp8() needs torchao: `pip install torchao`.") from error

        def still_bfloat16(module, name=None) -> bool:
            return isinstance(module, torch.nn.Linear) and not _is_quantized(module.weight)

        config = quantization.Float8DynamicActivationFloat8WeightConfig(
            granularity=quantization.PerRow(), set_inductor_config=False
        )
        quantization.quantize_(self.unet, config, filter_fn=still_bfloat16)  # a second call converts nothing twice
        return sum(
            isinstance(module, torch.nn.Linear) and not still_bfloat16(module) for module in self.unet.modules()
        )

    def disable_cuda_graphs(self) -> None:
        """Run the UNet eagerly again and release the captured graphs."""
        self._cuda_graphs = None

    @contextmanager
    def _controlled_unet(self, control: _Control):
        """Install ``control``'s processors over the user's for the duration (always restoring the user's), and
        yield the control the loop must use: with CUDA graphs on, an earlier control of the same structure holding
        this call's values, so the graphs captured with it replay."""
        runner = self._cuda_graphs
        if runner is not None:
            if runner.unet is not self.unet:  # the UNet was swapped since enable_cuda_graphs()
                runner = self._cuda_graphs = _CUDAGraphUNet(self.unet, runner.compile)
            control = runner.adopt(control)
        saved = self.unet.attn_processors
        if control.processors:
            self.unet.set_attn_processor({name: control.processors.get(name, proc) for name, proc in saved.items()})
        try:
            if runner is not None:
                runner.refresh_key()
            yield control
        finally:
            if control.processors:
                self.unet.set_attn_processor(saved)

    @contextmanager
    def count_unet_calls(self):
        """Record every UNet evaluation this thread makes inside the ``with`` block (eager, replayed as a CUDA graph,
        or with gradients for NTI) into the yielded `UNetCallLog`. Calls of other threads on the same pipeline are
        theirs to count (a call runs wholly in the thread that made it); nested blocks each see the calls made
        inside them. Benchmarks and tests read it; it costs nothing when off."""
        log, thread = UNetCallLog(), threading.get_ident()
        self._unet_call_logs.setdefault(thread, []).append(log)
        try:
            yield log
        finally:
            logs = [other for other in self._unet_call_logs[thread] if other is not log]  # logs compare equal
            if logs:
                self._unet_call_logs[thread] = logs
            else:
                del self._unet_call_logs[thread]

    def _predict_noise(self, latents, timestep, embeds, alpha, added_cond: dict | None = None) -> torch.Tensor:
        """ε(z, t, c) in float32, converted from v-prediction when the model predicts v. ``added_cond``: SDXL's
        ``_added_conditioning`` for the same rows."""
        runner = self._cuda_graphs
        logs = self._unet_call_logs.get(threading.get_ident(), ())
        for log in logs:
            log.calls.append((latents.shape[0], torch.is_grad_enabled()))
        if runner is not None and not torch.is_grad_enabled():
            captures = runner.captures
            output = runner(latents.to(self.unet.dtype), timestep, embeds, added_cond)
            for log in logs:
                log.captures += runner.captures - captures
        else:
            inputs = {"latents": latents.to(self.unet.dtype), "timestep": timestep, "embeds": embeds}
            output = _unet_forward(self.unet, {**inputs, **(added_cond or {})})
        output = output.float()
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type == "v_prediction":
            return v_prediction_to_noise(output, latents.float(), alpha)
        if prediction_type != "epsilon":
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported (use 'epsilon' or 'v_prediction')."
            )
        return output

    def _added_conditioning(self, pooled: torch.Tensor | None, image_size: tuple[int, int]) -> dict | None:
        """SDXL's added conditioning of each row (Podell et al. 2023, §2.2): its pooled text embedding and the time
        ids of the inverted image, taken whole: original size = target size = ``image_size``, crop (0, 0). `None`
        for SD 1.x/2.x (``pooled`` is `None`)."""
        if pooled is None:
            return None
        time_ids = torch.tensor(sdxl_time_ids(image_size), dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(len(pooled), -1)}

    def _model_signature(self) -> dict:
        """Fingerprint of the models an inversion depends on, so that it is only ever edited with them.

        - ``config``: one digest of the UNet's, VAE's and text encoders' architecture configs (as earlier versions
          recorded it); ``configs``: a digest per model, and of the scheduler's noise schedule, so that a mismatch
          names the model.
        - ``weights``: per model, `SIGNATURE_SAMPLES` evenly strided values of every parameter tensor (float32,
          base64). They are compared within bfloat16 rounding (`_weights_match`), so the same weights saved,
          reloaded or cast to float16 or bfloat16 match, and weights changed wherever a sample falls do not. The
          cost is one strided view per tensor and one copy per model, whatever the models' size.
        """
        models = self._signed_models()
        configs = {
            name: _architecture_config(_text_encoder_config(model) if "text_encoder" in name else dict(model.config))
            for name, model in models.items()
        }
        return {
            "config": _digest(configs),
            "configs": {
                **{name: _digest(config) for name, config in configs.items()},
                "scheduler": _digest(self._schedule_config()),
            },
            "weights": {name: _weight_samples(name, model) for name, model in models.items()},
        }

    def _signed_models(self) -> dict:
        models = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.is_sdxl:  # SD 1.x/2.x signatures stay those of files saved before SDXL support
            models["text_encoder_2"] = self.text_encoder_2
        return models

    def _schedule_config(self) -> dict:
        """What the DDIM schedule `_ddim_schedule` builds depends on: the noise schedule, its timesteps and the
        prediction type (any scheduler class with the same values gives the same steps)."""
        scheduler = self.scheduler
        if not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(scheduler.config)
        return {key: scheduler.config.get(key) for key in _SCHEDULE_KEYS}

    def _signature_differences(self, inversion: InversionResult) -> list[str]:
        """The models of this pipeline that differ from those that made ``inversion``, each with what differs."""
        mine, theirs = self._model_signature(), inversion.model_signature
        if not theirs:
            return ["the inversion records no model signature (pipe.invert() records one)"]
        if "weights" not in theirs:
            return self._earlier_signature_differences(mine, theirs)
        their_configs, their_weights = theirs.get("configs"), theirs.get("weights")
        if not (isinstance(their_configs, dict) and isinstance(their_weights, dict)):
            return ["its model signature is malformed"]
        differences = {}
        for name, digest in mine["configs"].items():
            if their_configs.get(name) != digest:
                differences.setdefault(name, []).append("config")
        for name, samples in mine["weights"].items():
            if not _weights_match(samples, their_weights.get(name)):
                differences.setdefault(name, []).append("weights")
        latent_height = inversion.latents.shape[-2]
        their_factor = inversion.image_size[0] // latent_height if latent_height else None
        if "vae" in differences and their_factor != self.vae_scale_factor:
            differences["vae"].append(f"VAE factor {self.vae_scale_factor} here, {their_factor} in the inversion")
        return [f"{name} ({', '.join(what)})" for name, what in differences.items()]

    def _earlier_signature_differences(self, mine: dict, theirs: dict) -> list[str]:
        """The same for a file saved by an earlier version, whose signature holds one digest of all configs and the
        first 8 values of each model's first weight tensor."""
        probes = theirs.get("probe")
        differences = []
        if mine["config"] != theirs.get("config"):
            differences.append(
                "the config of the UNet, VAE or text encoder (a file of an earlier version, which does"
                " not record which)"
            )
        for name, model in self._signed_models().items():
            first = next(model.parameters()).detach().flatten()[:8].float().cpu()
            if not (isinstance(probes, dict) and _same_weights([float(v) for v in first], probes.get(name))):
                differences.append(f"{name} (weights)")
        return differences

    def check_inversion(self, inversion: "InversionResult", num_inference_steps: int | None = None) -> InversionResult:
        """Raise if ``inversion`` is malformed or was made by other models or with another step count than asked for.

        Returns it as this file's `InversionResult` (see `_as_inversion_result`).
        """
        inversion = _as_inversion_result(inversion)
        inversion._check_consistency("inversion")
        if (inversion.pooled_prompt_embeds is not None) != self.is_sdxl:
            made_by, this = ("SDXL", "SD 1.x/2.x") if not self.is_sdxl else ("SD 1.x/2.x", "SDXL")
            raise ValueError(
                f"This inversion was made by an {made_by} pipeline, this pipeline is {this}: their text embeddings"
                " and UNet conditioning differ; invert the image again with this pipeline."
            )
        if num_inference_steps is not None:
            _check_steps(num_inference_steps, self.scheduler.config.num_train_timesteps)
        if num_inference_steps is not None and num_inference_steps != inversion.num_inference_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} but the inversion was made with"
                f" {inversion.num_inference_steps} steps; invert again with the step count you want."
            )
        differences = self._signature_differences(inversion)
        if differences:
            raise ValueError(
                f"This inversion was made with different models than this pipeline's: {'; '.join(differences)}."
                " Invert the image again with this pipeline."
            )
        problems = inversion._image_size_problems(self.vae_scale_factor)  # only a hand-made object gets here
        if problems:
            raise _invalid("inversion", problems)
        timesteps = self._ddim_schedule(inversion.num_inference_steps, "cpu")[0]
        if timesteps.tolist() != inversion.timesteps.tolist():
            raise ValueError(
                f"This inversion ran at timesteps {inversion.timesteps.tolist()}, this pipeline's scheduler gives"
                f" {timesteps.tolist()} for {len(timesteps)} steps (another timestep_spacing or steps_offset);"
                " invert the image again with this pipeline."
            )
        return inversion

    def load_inversion(self, path: str | os.PathLike, num_inference_steps: int | None = None) -> InversionResult:
        """`InversionResult.load` plus a check that this pipeline's models made it."""
        return self.check_inversion(InversionResult.load(path), num_inference_steps)

    @contextmanager
    def _frozen_unet(self):
        flags = [p.requires_grad for p in self.unet.parameters()]
        self.unet.requires_grad_(False)
        try:
            yield
        finally:
            for parameter, flag in zip(self.unet.parameters(), flags):
                parameter.requires_grad_(flag)

    def _attention_layers(self, latent_size: tuple[int, int]) -> list[AttentionLayer]:
        """The UNet's attention layers in call order (down → mid → up; self before cross within a block), with their
        map sizes for a latent of ``latent_size``."""
        levels = len(self.unet.config.down_block_types)
        sizes = [tuple(latent_size)]
        for _ in range(levels - 1):
            sizes.append(tuple(math.ceil(s / 2) for s in sizes[-1]))
        placed = []
        for name in self.unet.attn_processors:
            parts = name.split(".")
            if parts[0] == "down_blocks":
                stage, level, rest = 0, int(parts[1]), parts[2:]
            elif parts[0] == "mid_block":
                stage, level, rest = 1, levels - 1, parts[1:]
            else:
                stage, level, rest = 2, levels - 1 - int(parts[1]), parts[2:]
            order = (stage, int(parts[1]) if stage != 1 else 0, *[int(p) for p in rest if p.isdigit()], rest[-2])
            placed.append((order, name, rest[-2] == "attn2", stage == 2, level))
        placed.sort()
        blocks = itertools.accumulate(not cross for _, _, cross, _, _ in placed)
        return [
            AttentionLayer(name, cross, decoder, level, sizes[level], block - 1)
            for (_, name, cross, decoder, level), block in zip(placed, blocks)
        ]

    # -------------------------------------------------------------------------------------------------------------
    # Inversion

    def _check_invert_inputs(self, image, source_prompt, num_inference_steps, guidance_scale, method, null_text):
        _check_choice("inversion_method", method, INVERSION_METHODS)
        prompts = _as_prompt_list(source_prompt, "source_prompt")
        images = _as_image_list(image)
        if len(prompts) != len(images):
            raise ValueError(
                f"source_prompt has {len(prompts)} prompt(s) for {len(images)} image(s); give one per image."
            )
        _check_steps(num_inference_steps, self.scheduler.config.num_train_timesteps)
        _check_guidance(guidance_scale, method)
        _check_null_text_settings(*null_text)
        self._warn_truncated_prompts(prompts)
        return prompts

    @_one_call_at_a_time
    @torch.no_grad()
    def invert(
        self,
        image,
        source_prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        inversion_method: str | None = None,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str = "crop",
        null_text_inner_steps: int | None = None,
        null_text_early_stop: float | None = None,
        null_text_init: str | None = None,
    ) -> InversionResult:
        r"""Invert images into DDIM trajectories (and, for NTI, per-step null-text embeddings).

        Args:
            image (`PIL.Image.Image`, `str`, `os.PathLike`, `np.ndarray`, `torch.Tensor` or a list of them):
                Images (or image files) to invert; see `_prepare_images` for formats and the resize policy.
            source_prompt (`str` or `list[str]`): One prompt describing each image.
            num_inference_steps (`int`, defaults to 50): DDIM steps; edits must use the same count.
            guidance_scale (`float`, defaults to 7.5): Guidance scale the edits will use; NTI optimises for it
                (must be >= 1), NPI and DDIM invert at scale 1 regardless.
            inversion_method (`str`, *optional*): Overrides the pipeline's ``inversion_method``.
            height, width (`int`, *optional*): Output size in pixels, multiples of the VAE factor; defaults to the
                model's native size.
            resize_mode (`str`, defaults to `"crop"`): ``"crop"`` keeps the aspect ratio and centre-crops;
                ``"stretch"`` resizes to the output size directly.
            null_text_inner_steps, null_text_early_stop, null_text_init: Override the pipeline's NTI settings.

        Returns:
            `InversionResult`
        """
        # 1. Check inputs
        config = self.config  # `None` takes the pipeline's flag; any other value is checked ("" and 0 too)
        method = config.inversion_method if inversion_method is None else inversion_method
        inner_steps = config.null_text_inner_steps if null_text_inner_steps is None else null_text_inner_steps
        early_stop = config.null_text_early_stop if null_text_early_stop is None else null_text_early_stop
        init = config.null_text_init if null_text_init is None else null_text_init
        prompts = self._check_invert_inputs(
            image, source_prompt, num_inference_steps, guidance_scale, method, (inner_steps, early_stop, init)
        )
        signature = self._model_signature()  # raises now, not after the inversion, for weights it cannot read
        images = self._prepare_images(image, height, width, resize_mode)
        device = self._execution_device

        # 2. Encode prompts and images
        prompt_embeds, pooled = self.encode_text(prompts, device)
        latents = self.encode_images(images)
        image_size = tuple(images.shape[-2:])
        added_cond = self._added_conditioning(pooled, image_size)

        # 3. DDIM inversion (w = 1, source prompt)
        timesteps, alphas, alphas_next = self._ddim_schedule(num_inference_steps, device)
        null_embeds = losses = null_pooled = None
        with self._controlled_unet(_Control()):
            trajectory = self._ddim_inversion(latents, prompt_embeds, timesteps, alphas, alphas_next, added_cond)

            # 4. Null-text optimisation around the trajectory (the sequence embedding; SDXL's pooled one stays
            # that of the initialisation)
            if INVERSION_METHODS[method].optimises_null_text:
                start, null_pooled = prompt_embeds, pooled
                if init == "null":
                    empty, empty_pooled = self._null_embedding(self.encode_text([""], device))
                    start, null_pooled = empty.expand_as(prompt_embeds), _expand_rows(empty_pooled, len(prompts))
                null_embeds, losses = self._null_text_optimization(
                    trajectory,
                    prompt_embeds,
                    start,
                    timesteps,
                    alphas,
                    alphas_next,
                    guidance_scale,
                    inner_steps,
                    early_stop,
                    added_cond,
                    self._added_conditioning(null_pooled, image_size),
                )

        self.maybe_free_model_hooks()
        return InversionResult(
            latents=_ensure_finite(trajectory, "The inversion latents", self.unet).cpu(),
            prompt_embeds=prompt_embeds.cpu(),
            source_prompts=prompts,
            timesteps=timesteps.cpu(),
            method=method,
            guidance_scale=float(guidance_scale),
            image_size=image_size,
            null_embeds=_on_cpu(null_embeds),
            null_text_losses=_on_cpu(losses),
            model_signature=signature,
            pooled_prompt_embeds=_on_cpu(pooled),
            null_pooled_embeds=_on_cpu(null_pooled),
        )

    def _ddim_inversion(self, latents, prompt_embeds, timesteps, alphas, alphas_next, added_cond=None) -> torch.Tensor:
        """ALGORITHMS §1: run DDIM upwards with ε(z, t, E(src)) evaluated at the destination t. → (B, N+1, …)."""
        trajectory = [latents]
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i in reversed(range(len(timesteps))):
                noise = self._predict_noise(trajectory[-1], timesteps[i], prompt_embeds, alphas[i], added_cond)
                trajectory.append(ddim_step(trajectory[-1], noise, alphas_next[i], alphas[i]))
                progress_bar.update()
        return torch.stack(trajectory, dim=1)

    def _null_text_optimization(
        self,
        trajectory,
        prompt_embeds,
        start_embeds,
        timesteps,
        alphas,
        alphas_next,
        guidance_scale,
        inner_steps,
        early_stop,
        added_cond=None,
        null_added_cond=None,
    ):
        """ALGORITHMS §2 (Mokady et al. 2023, Alg. 1): per step, optimise the unconditional embedding so that the
        guided DDIM step lands on the inversion trajectory.

        What is optimised is the unconditional *sequence* embedding (77 tokens × the UNet's cross-attention width;
        2048 on SDXL), one per step, as in the paper. On SDXL the unconditional branch's added conditioning
        (``null_added_cond``: pooled embedding and time ids) stays fixed at that of the initialisation: the pooled
        vector enters only through the timestep embedding, so the sequence's 77 × 2048 values already reach every
        cross-attention layer, and a fixed pooled null keeps NTI initialised from the prompt exactly NPI at zero
        inner steps.

        The UNet is frozen and runs in its own dtype; the embeddings and the loss are float32. Images of a batch are
        optimised together but independently (per-image loss, element-wise Adam, per-image early stop).
        The learning rate ``1e-2·(1 − i/(2N))`` is the reference's ``1e-2·(1 − i/100)`` at N = 50, kept positive
        for any N.
        """
        loss_scale = 1024.0  # power of two: exact in float32, keeps fp16 gradients of a ~1e-4 loss from underflow
        steps = len(timesteps)
        batch = trajectory.shape[0]
        latents = trajectory[:, -1]
        null = start_embeds.float().clone()
        nulls = []
        losses = torch.full((batch, steps, inner_steps), float("nan"), device=latents.device)
        with self._frozen_unet(), self.progress_bar(total=steps * inner_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                target = trajectory[:, steps - i - 1]
                noise_cond = self._predict_noise(latents, t, prompt_embeds, alphas[i], added_cond)
                null = null.detach().clone().requires_grad_(True)
                optimizer = torch.optim.Adam([null], lr=1e-2 * (1 - i / (2 * steps)))
                active = torch.ones(batch, dtype=torch.bool, device=latents.device)
                for j in range(inner_steps):
                    with torch.enable_grad():
                        noise_uncond = self._predict_noise(
                            latents, t, null.to(self.unet.dtype), alphas[i], null_added_cond
                        )
                        noise = classifier_free_guidance(noise_uncond, noise_cond - noise_uncond, guidance_scale)
                        loss = (
                            (ddim_step(latents, noise, alphas[i], alphas_next[i]) - target).pow(2).flatten(1).mean(1)
                        )
                        (loss.sum() * loss_scale).backward()
                    null.grad /= loss_scale
                    before = null.detach().clone()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        null[~active] = before[~active]
                    losses[:, i, j] = torch.where(active, loss.detach(), float("nan"))
                    active &= ~(loss.detach() < early_stop + i * 2e-5)
                    progress_bar.update()
                    if not active.any():
                        progress_bar.update(inner_steps - j - 1)
                        break
                null = null.detach()
                nulls.append(null.clone())
                noise_uncond = self._predict_noise(latents, t, null.to(self.unet.dtype), alphas[i], null_added_cond)
                noise = classifier_free_guidance(noise_uncond, noise_cond - noise_uncond, guidance_scale)
                latents = ddim_step(latents, noise, alphas[i], alphas_next[i])
        return torch.stack(nulls, dim=1), losses

    # -------------------------------------------------------------------------------------------------------------
    # Editing

    def check_inputs(
        self,
        inversion,
        guidance_scale,
        guidance_rescale,
        attention_control,
        proximal_guidance,
        target_guidance,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ):
        _check_guidance(guidance_scale, inversion.method)
        _check_number("guidance_rescale", guidance_rescale, 0, 1)
        _check_choice("target_guidance", target_guidance, TARGET_GUIDANCES, allow_none=True)
        if attention_control is not None:
            layers = self._attention_layers(tuple(inversion.latents.shape[-2:]))
            attention_control.check(inversion.num_inference_steps, layers)
        if proximal_guidance is not None:
            proximal_guidance.check()
        _check_choice("output_type", output_type, ("pil", "np", "pt", "latent"))
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(
                "callback_on_step_end must be a function (pipe, step, timestep, tensors) -> dict, a PipelineCallback"
                f" or MultiPipelineCallbacks, got {type(callback_on_step_end).__name__}."
            )
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {sorted(unknown)}."
            )
        if INVERSION_METHODS[inversion.method].optimises_null_text and guidance_scale != inversion.guidance_scale:
            logger.warning(
                f"This null-text inversion was optimised for guidance_scale={inversion.guidance_scale:g}; edited at"
                f" {guidance_scale:g} its null text no longer retraces the image. Leave guidance_scale unset to edit"
                " at the inversion's scale, or invert again at this one."
            )

    @_one_call_at_a_time
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)  # the "Examples:" line below becomes EXAMPLE_DOC_STRING
    def __call__(
        self,
        prompt: str | list[str] | list[list[str]] | None = None,
        inversion: InversionResult | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        attention_control: str | PromptToPrompt | MasaCtrl | None = None,
        proximal_guidance: str | ProximalGuidance | bool | None = None,
        inversion_method: str | None = None,
        target_guidance: str | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        return_edit_mask: bool = False,
        return_attention_maps: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        callback_on_step_end: Callable[[Any, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        generator: torch.Generator | list[torch.Generator] | None = None,
        image=None,
        num_images_per_prompt: int | None = None,
        latents: torch.Tensor | None = None,
        eta: float | None = None,
    ):
        r"""Regenerate inverted images: reconstruct them, or edit them toward target prompts.

        Args:
            prompt (`str`, `list[str]`, `list[list[str]]`, *optional*):
                Target prompt(s). `None` (or the source prompt) reconstructs. With one inverted image a list gives
                several targets, all edited in one batch; with a batch of inverted images give one prompt per image
                (or a list of targets per image). Each output equals editing that target alone. Under Direct
                Inversion a reconstruction is z*_0 itself (no UNet pass); with attention control a target equal to
                its source is edited like any other (re-weighting the source prompt's words, say).
            inversion (`InversionResult`): From `invert` or `load_inversion`.
            guidance_scale (`float`, *optional*): Classifier-free guidance scale w. Defaults to the scale a null-text
                inversion was optimised for (``inversion.guidance_scale``; another one logs a warning), else 7.5.
            num_inference_steps (`int`, *optional*): Must equal the inversion's step count if given.
            attention_control (`str`, `PromptToPrompt` or `MasaCtrl`, *optional*): How targets follow their source:
                prompt-to-prompt (word swap, refinement, re-weighting, local blend) or mutual self-attention. The
                names ``"p2p"`` and ``"masactrl"`` stand for those techniques with their default settings.
            proximal_guidance (`str`, `ProximalGuidance` or `bool`, *optional*): Proximal guidance of the edited
                samples; ``"soft"``/``"hard"`` for that mode's defaults, `False` for none, `None` for the pipeline's
                ``proximal_guidance`` flag.
            inversion_method (`str`, *optional*): Edit as this method instead of the inversion's. ``"npi"``,
                ``"ddim"`` and ``"direct"`` regenerate from the stored DDIM trajectory alone, so each edits any
                inversion (an NPI inversion edited as ``"direct"`` is Direct Inversion); ``"nti"`` needs an NTI
                inversion's optimised null text.
            target_guidance (`str`, *optional*): What each edited target's guidance is taken against:
                ``"inversion"``, the method's unconditional embedding (E(source) for NPI, U[i] for NTI, E("") for
                DDIM), or ``"null"``, the null embedding (E("") or ``negative_prompt``; NTI's is its U[i]). Default:
                ``"null"`` for MasaCtrl's synthesised targets, ``"inversion"`` otherwise. Direct Inversion is DDIM's
                guidance plus a pinned source, so for it (as for DDIM) both are E(""). NPI with prompt-to-prompt and
                ``"null"`` is PnP Inversion's target guidance without its pinned source (Ju et al. 2024, §4).
                Reconstructing targets (their source prompt, no control) always keep the method's.
            negative_prompt (`str` or `list[str]`, *optional*): The prompt of the null embedding that null-guided
                targets are steered against (Direct Inversion's and DDIM's targets, MasaCtrl's, ``target_guidance=
                "null"``): one for every target, or one per target in output order. Default: E(""), all zeros on
                SDXL with ``force_zeros_for_empty_prompt``. Source branches keep E(""). Refused where no target is
                null-guided (NPI's and NTI's prompt-to-prompt targets: see ``target_guidance``).
            prompt_embeds (`torch.Tensor`, *optional*): Target embeddings ``(n, tokens, dim)`` instead of ``prompt``
                (rows as prompts: one for every image, one per image, or with one image one per target). Always
                edited, never taken for the source prompt. Prompt-to-prompt aligns words, so it needs ``prompt``.
            negative_prompt_embeds (`torch.Tensor`, *optional*): ``negative_prompt`` as embeddings ``(1 or targets,
                tokens, dim)``.
            pooled_prompt_embeds, negative_pooled_prompt_embeds (`torch.Tensor`, *optional*): SDXL only: the pooled
                embeddings ``(n, dim)`` of text_encoder_2 that go with ``prompt_embeds`` / ``negative_prompt_embeds``.
            return_edit_mask (`bool`, defaults to False): Return proximal guidance's edit masks as images.
            return_attention_maps (`bool`, defaults to False): Return the average cross-attention maps of each output
                (`attention_heat_maps` draws them).
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to True): Return a `NegativePromptInversionPipelineOutput`, else a tuple.
            guidance_rescale (`float`, defaults to 0.0): Guidance rescale factor φ from [Common Diffusion Noise
                Schedules and Sample Steps are Flawed](https://huggingface.co/papers/2305.08891) (§3.4), as in
                diffusers' pipelines: the guided prediction is scaled toward the conditional one's standard
                deviation, against the over-exposure of strong guidance (the paper uses 0.7 with zero-terminal-SNR
                models). 0 leaves guidance as is.
            callback_on_step_end, callback_on_step_end_tensor_inputs: As in diffusers' pipelines; the callback must
                return a dict (``latents`` in it replace the pipeline's: same shape, dtype and device, finite).
                ``latents`` holds every denoised branch (per image: its source branch when attention control is on,
                then its targets; a Direct Inversion reconstruction is z*_0 itself and never denoised);
                ``edit_mask`` is proximal guidance's mask M of the edited branches (`None` without it). The callback
                must not call a pipeline that shares this UNet.
            generator, image, num_images_per_prompt, latents, eta: Refused with the alternative named: editing is
                deterministic DDIM (η = 0) from the inversion's z_T; images are inverted by `invert`; several outputs
                come from several target prompts.

        Examples:

        Returns:
            `NegativePromptInversionPipelineOutput` or `tuple`.
        """
        # 1. Check inputs (everything that can fail does so here or in steps 2–3, before any model runs)
        _refuse_unused_arguments(
            generator=generator, image=image, num_images_per_prompt=num_images_per_prompt, latents=latents, eta=eta
        )
        attention_control = _as_attention_control(attention_control)
        proximal_guidance = _as_proximal_guidance(proximal_guidance, self.config.proximal_guidance)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        inversion = self.check_inversion(inversion, num_inference_steps)  # as this file's class, whichever made it
        inversion = _edited_as(inversion, inversion_method)
        if guidance_scale is None:
            guidance_scale = (
                inversion.guidance_scale if INVERSION_METHODS[inversion.method].optimises_null_text else 7.5
            )
        self.check_inputs(
            inversion,
            guidance_scale,
            guidance_rescale,
            attention_control,
            proximal_guidance,
            target_guidance,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        targets, negatives, given = _edit_prompts(
            prompt,
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
            inversion,
            attention_control,
        )
        self._check_target_prompts([[p for p in ps if isinstance(p, str)] for ps in targets], inversion.source_prompts)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        steps = inversion.num_inference_steps

        # 2. Lay out the branches (latents) and the UNet batch rows that serve them
        branches = plan_branches(
            inversion, targets, attention_control, target_guidance, negatives, return_attention_maps
        )
        if negatives is not None:
            _check_negative_prompt_is_read(branches, inversion.method)
        denoised = [branch for branch in branches if branch.denoised]
        rows = lay_out_rows(denoised, guidance_scale)

        # 3. Prepare attention control (text-side mapping raises here, before any UNet work)
        control = self._prepare_control(
            attention_control,
            denoised,
            rows,
            steps,
            tuple(inversion.latents.shape[-2:]),
            return_attention_maps,
            device,
        )

        # 4. Encode: the embeddings of every row at every step (and SDXL's added conditioning of every row)
        row_embeds, row_pooled = self._row_embeddings(denoised, rows, inversion, given, device)
        added_cond = self._added_conditioning(row_pooled, inversion.image_size)

        # 5. Denoise from z_T: per step one UNet batch, guidance, a DDIM step, then the step hooks
        timesteps, alphas, alphas_next = self._ddim_schedule(steps, device)
        images_of = _index([branch.image for branch in denoised], device)
        trajectory = inversion.latents.to(device)[images_of]  # (branches, N + 1, …): each branch's image's z*
        latents = trajectory[:, steps].clone()
        row_index = rows.index(device)
        edited = _index([k for k, branch in enumerate(denoised) if not branch.is_source], device)
        proximal = (
            None
            if proximal_guidance is None
            else proximal_guidance.prepare(
                edited, timesteps.tolist(), torch.zeros(len(denoised), 1, *latents.shape[-2:], device=device)
            )
        )
        callback = _StepCallback(self, callback_on_step_end, callback_on_step_end_tensor_inputs, steps)
        self._num_timesteps = steps if denoised else 0  # Direct Inversion's reconstructions alone: no step to run

        with self._controlled_unet(control) as control, self.progress_bar(total=self._num_timesteps) as progress_bar:
            context = StepContext(trajectory, control.store)  # the store of the installed (perhaps adopted) control
            hooks = _step_hooks(denoised, proximal, control, device)
            for i, t in enumerate(timesteps[: self._num_timesteps]):
                if self.interrupt:
                    continue
                context.index = i
                control.step.fill_(i)
                noise_cond, noise_uncond = self._branch_noise(
                    latents, t, alphas[i], row_index, row_embeds[i], added_cond
                )
                noise = _guided_noise(noise_cond, noise_uncond, guidance_scale, guidance_rescale, proximal, context)
                latents = _denoising_step(latents, noise, alphas[i], alphas_next[i], proximal, context)
                for hook in hooks:
                    latents = hook(latents, context)
                latents = callback(i, t, latents, context)
                progress_bar.update()
        callback.check_finite()

        # 6. Decode the targets (a reconstruction that Direct Inversion never denoised is its image's z*_0)
        outputs = _index(_output_rows(branches), device)
        origins = inversion.latents[:, 0].to(device)
        latents = _ensure_finite(torch.cat([latents, origins])[outputs], "The denoised latents", self.unet)
        if output_type == "latent":
            images, has_nsfw = latents, None
        else:
            images = _ensure_finite(self.decode_latents(latents), "The decoded images", self.vae)
            images, has_nsfw = self.run_safety_checker(images, device, self.unet.dtype)
            do_denormalize = [True] * len(images) if has_nsfw is None else [not flag for flag in has_nsfw]
            images = self.image_processor.postprocess(images, output_type=output_type, do_denormalize=do_denormalize)
        edit_masks = None
        if return_edit_mask and proximal_guidance is not None:
            fraction = torch.cat([proximal.fraction, torch.zeros_like(origins[:, :1])])[outputs]
            edit_masks = _masks_to_images(fraction / steps, inversion.image_size)
        attention_maps = None
        if return_attention_maps:  # every branch was denoised (`Branch.denoised`)
            maps = control.store.average()
            attention_maps = [maps[k].cpu() for k in outputs.tolist()]

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, has_nsfw)
        return NegativePromptInversionPipelineOutput(
            images=images, nsfw_content_detected=has_nsfw, edit_masks=edit_masks, attention_maps=attention_maps
        )

    # -------------------------------------------------------------------------------------------------------------
    # Editing: building blocks

    def _branch_noise(self, latents, timestep, alpha, row_index, embeds, added_cond=None):
        """ε of every branch from one UNet batch: ``(conditional, unconditional)`` per branch. ``row_index``:
        `RowLayout.index` (the branch of each row, each branch's conditional and unconditional row)."""
        row_branch, cond_rows, uncond_rows = row_index
        noise = self._predict_noise(latents[row_branch], timestep, embeds, alpha, added_cond)
        return noise[cond_rows], noise[uncond_rows]

    def _row_embeddings(
        self, branches: list[Branch], rows: RowLayout, inversion: InversionResult, given: dict, device
    ):
        """``(steps, rows, tokens, dim)`` text embeddings, and on SDXL ``(rows, dim)`` pooled embeddings (else
        `None`); only NTI's rows change from step to step (its pooled null is fixed). ``given``: the rows of
        ``prompt_embeds`` and ``negative_prompt_embeds`` by their `_GivenEmbedding`."""
        if not branches:  # Direct Inversion's reconstructions alone: no UNet row
            return None, None
        dtype = self.unet.dtype
        on_device = lambda tensor: None if tensor is None else tensor.to(device=device, dtype=dtype)  # noqa: E731
        source = (on_device(inversion.prompt_embeds), on_device(inversion.pooled_prompt_embeds))
        null_text = (on_device(inversion.null_embeds), on_device(inversion.null_pooled_embeds))
        prompts = [b.prompt for b in branches if b.prompt != b.source_prompt]
        negatives = [b.negative for b in branches if b.uncond == "negative"]
        texts = self._encode_unique([text for text in prompts + negatives if isinstance(text, str)], device)
        texts.update({key: tuple(map(on_device, value)) for key, value in given.items()})
        embedding = {  # (sequence, pooled) by where an embedding comes from (see InversionMethod)
            "source": lambda branch: tuple(_row(tensor, branch.image) for tensor in source),
            "negative": lambda branch: (
                self._null_embedding(texts[""]) if branch.negative == "" else texts[branch.negative]
            ),
            "null_text": lambda branch: tuple(_row(tensor, branch.image) for tensor in null_text),
            "prompt": lambda branch: texts[branch.prompt],
        }
        embeds = [None] * rows.num_rows
        for branch, cond, uncond in zip(branches, rows.cond, rows.uncond):
            embeds[cond] = embedding["source" if branch.prompt == branch.source_prompt else "prompt"](branch)
            if uncond != cond:
                embeds[uncond] = embedding[branch.uncond](branch)
        embeds, pooled = zip(*embeds)
        pooled = None if pooled[0] is None else torch.stack(pooled)
        steps = inversion.num_inference_steps
        if all(row.dim() == 2 for row in embeds):
            return torch.stack(embeds)[None].expand(steps, -1, -1, -1), pooled
        return torch.stack([row.expand(steps, -1, -1) if row.dim() == 2 else row for row in embeds], dim=1), pooled

    def _map_level(self, layers: list[AttentionLayer], level: int | None = None) -> tuple[int, tuple[int, int]]:
        """Cross-attention map size read by local blend and visualisation: ``level`` if given (``"finest"``: the
        finest with cross-attention), else ¼ of the latent (16×16 at 512 px, as the references) but not coarser than
        16 on the short side (`LocalBlend`)."""
        sizes = {layer.level: layer.size for layer in layers if layer.cross}
        if level == "finest":
            level = min(sizes)
        elif level is None:
            level = max([lv for lv, size in sizes.items() if min(size) >= 16 and lv <= 2], default=min(sizes))
        height, width = sizes[level]
        return height * width, (height, width)

    def _prepare_control(
        self, attention_control, branches, rows, steps, latent_size, return_attention_maps, device
    ) -> _Control:
        """This call's processors (by layer name), attention store and per-step hooks. All text-side validation
        (words missing from prompts, edits of different word counts) raises here."""
        control = _Control(step=torch.zeros((), dtype=torch.long, device=device))
        needs_maps = return_attention_maps or getattr(attention_control, "needs_attention_maps", False)
        if attention_control is None and not needs_maps:
            return control
        layers = self._attention_layers(latent_size)
        if needs_maps:
            length, size = self._map_level(layers, getattr(attention_control, "attention_map_level", None))
            control.store = AttentionStore(length, size, len(branches), self.tokenizer.model_max_length, device)
        plan = EditPlan(branches, rows, layers, steps, control.step, control.store, self.tokenizer, device)
        rules, hook = attention_control.prepare(plan) if attention_control is not None else ({}, None)
        if control.store is not None:  # record the maps of cross-attention layers the control leaves alone
            empty = _index([], device)
            recorder = CrossAttentionControl(control.step, plan.cond_rows, empty, empty, store=control.store)
            rules = {**{layer.name: recorder for layer in layers if layer.cross}, **rules}
        processors = {id(rule): ControlledAttnProcessor(rule) for rule in rules.values()}
        control.processors = {name: processors[id(rule)] for name, rule in rules.items()}
        control.hooks = [hook] if hook is not None else []
        return control

    def attention_heat_maps(self, maps: torch.Tensor, prompt: str, image: PIL.Image.Image | None = None):
        """A PIL grid of one prompt's cross-attention maps (``output.attention_maps[k]``), one tile per token."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
        labels = [self.tokenizer.decode([token]) for token in ids]
        return heat_map_grid(maps[..., : len(ids)], labels, image)

    def run_safety_checker(self, image, device, dtype):
        if self.safety_checker is None:
            return image, None
        features = self.feature_extractor(
            self.image_processor.postprocess(image, output_type="pil"), return_tensors="pt"
        )
        return self.safety_checker(images=image, clip_input=features.pixel_values.to(device=device, dtype=dtype))


# =================================================================================================================
# Input helpers


# Config entries that record how a model was saved or loaded, not what its weights compute: `save_pretrained` adds
# `architectures` and `dtype`, a load in another dtype changes `dtype`, each library stamps its version, and runtime
# output switches can be set per load. Keys starting with "_" (`_name_or_path`, `_diffusers_version`,
# `_use_default_values`, ...) are bookkeeping of the same kind.
_INCIDENTAL_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
    }
)


def _text_encoder_config(text_encoder) -> dict:
    return text_encoder.config.to_diff_dict() if hasattr(text_encoder.config, "to_diff_dict") else {}


def _architecture_config(config) -> dict:
    return {key: value for key, value in config.items() if not (key.startswith("_") or key in _INCIDENTAL_CONFIG_KEYS)}


# Weights sampled per tensor for a model signature: the cost is per tensor, not per weight.
SIGNATURE_SAMPLES = 8
# The scheduler config keys that decide the DDIM steps (`_ddim_schedule`) and what the UNet predicts.
_SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "set_alpha_to_one",
    "steps_offset",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _weight_samples(name: str, model: torch.nn.Module) -> str:
    """`SIGNATURE_SAMPLES` evenly strided values of each parameter tensor of ``model`` (views: nothing is read but
    the samples), float32, base64."""
    picks = []
    with torch.no_grad():  # as_strided: one cheap view per tensor (slicing a flattened view costs ~15× more)
        for parameter_name, parameter in model.named_parameters():
            if parameter.is_meta:
                raise ValueError(
                    f"{name}.{parameter_name} is on the meta device, which holds no values: move the pipeline to a"
                    " device with pipe.to('cpu') or pipe.to('cuda')."
                )
            count, stride = min(SIGNATURE_SAMPLES, parameter.numel()), max(1, parameter.numel() // SIGNATURE_SAMPLES)
            if _is_quantized(parameter):  # torchao's FP8 weights: sample the values they stand for, not their storage
                picks.append(parameter.dequantize().flatten()[::stride][:count].clone())
                continue
            flat = parameter if parameter.is_contiguous() else parameter.contiguous()  # in its logical order
            picks.append(flat.as_strided((count,), (stride,)))
        if len({pick.device for pick in picks}) > 1:  # a model spread over devices
            picks = [pick.cpu() for pick in picks]
        samples = torch.cat(picks).float().cpu() if picks else torch.zeros(0)
    return base64.b64encode(samples.numpy().astype("<f4").tobytes()).decode("ascii")


def _weights_match(mine: str, theirs) -> bool:
    """Whether two `_weight_samples` are the same weights up to a cast. float16 and bfloat16 move a weight by at most
    half an ulp, 2⁻⁸ of its size for bfloat16 (2⁻¹¹ for float16), and float16 rounds tiny weights to multiples of
    2⁻²⁴: within bfloat16's eps (2⁻⁷) of the larger value plus 2⁻²⁴, any two casts of a weight agree, while weights
    that differ by more are other weights."""
    try:
        a, b = (
            np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4").astype(np.float64)
            for value in (mine, theirs)
        )
    except (TypeError, ValueError):
        return False
    if a.shape != b.shape:
        return False
    tolerance = torch.finfo(torch.bfloat16).eps * np.maximum(np.abs(a), np.abs(b)) + 2.0**-24
    with np.errstate(invalid="ignore"):  # inf − inf
        same = (np.abs(a - b) <= tolerance) | (a == b) | (np.isnan(a) & np.isnan(b))
    return bool(same.all())


def _same_weights(mine: list[float], theirs) -> bool:
    """Earlier versions' comparison of their signatures (8 values of one tensor): within bfloat16's eps of the largest
    value."""
    if not (isinstance(theirs, list) and len(theirs) == len(mine) and all(_is_real(value) for value in theirs)):
        return False
    tolerance = torch.finfo(torch.bfloat16).eps * max(abs(value) for value in mine)
    return all(abs(a - b) <= tolerance for a, b in zip(mine, theirs))


def _optional_component(name: str, value):
    """`None` for the `(library, class)` entry that `DiffusionPipeline.from_pipe(..., custom_pipeline=...)` passes.

    That call looks up `_optional_components` on `DiffusionPipeline` (empty), not on this class, so it hands the
    optional components over as config entries instead of modules.
    """
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and value[1] is not None:
            logger.warning(
                f"DiffusionPipeline.from_pipe(..., custom_pipeline=...) did not hand over {name} ({value[1]}); pass"
                f" {name}=pipe.{name} to keep it, or use NegativePromptInversionPipeline.from_pipe(pipe)."
            )
        return None
    return value


def _check_sdxl_components(unet, tokenizer, text_encoder_2, tokenizer_2) -> None:
    """An SDXL UNet (``addition_embed_type="text_time"``) reads text_encoder_2's pooled projection and six time ids;
    the two tokenizers must read the same number of tokens with one vocabulary, as P2P places edits by token position
    in both."""
    added = unet.config.get("addition_embed_type") == "text_time"
    if (text_encoder_2 is None) != (tokenizer_2 is None):
        raise ValueError("text_encoder_2 and tokenizer_2 come together (SDXL): pass both or neither.")
    if not added and text_encoder_2 is not None:
        raise ValueError(
            "text_encoder_2 and tokenizer_2 belong with an SDXL UNet (addition_embed_type='text_time'); this UNet has"
            f" addition_embed_type={unet.config.get('addition_embed_type')!r}."
        )
    if not added:
        return
    if text_encoder_2 is None:
        raise ValueError(
            "An SDXL UNet (addition_embed_type='text_time') needs text_encoder_2 and tokenizer_2."
            " DiffusionPipeline.from_pipe(..., custom_pipeline=...) does not hand them over: pass"
            " text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, or use"
            " NegativePromptInversionPipeline.from_pipe(pipe)."
        )
    expected = unet.config.projection_class_embeddings_input_dim
    given = text_encoder_2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    if given != expected:
        raise ValueError(
            f"The UNet's added embedding reads {expected} features, SDXL's conditioning gives {given}: text_encoder_2's"
            f" projection ({text_encoder_2.config.projection_dim}) and six time ids of"
            f" {unet.config.addition_time_embed_dim} each (the refiner's aesthetic-score conditioning is not supported)."
        )
    if tokenizer_2.model_max_length != tokenizer.model_max_length:
        raise ValueError(
            f"tokenizer reads {tokenizer.model_max_length} tokens, tokenizer_2 {tokenizer_2.model_max_length}; SDXL's"
            " tokenizers read the same number."
        )
    # Special and added tokens may differ (SDXL's second tokenizer pads with "!"); the BPE vocabulary may not.
    added = set(tokenizer.get_added_vocab()) | set(tokenizer_2.get_added_vocab())
    first, second = (
        {token: i for token, i in t.get_vocab().items() if token not in added} for t in (tokenizer, tokenizer_2)
    )
    if first != second:
        different = sorted(token for token in first.keys() | second.keys() if first.get(token) != second.get(token))
        raise ValueError(
            f"tokenizer_2 has another vocabulary than tokenizer ({len(second)} against {len(first)} tokens;"
            f" {len(different)} differ, e.g. {different[:3]}): SDXL's two tokenizers share CLIP's BPE vocabulary,"
            " and prompt-to-prompt places its edits by token position in both text encoders' embeddings."
        )


def _check_device(device) -> None:
    """Refuse, naming it, a device this process cannot run the pipeline on."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"device {device!r} is not a device torch can use: {error}") from None
    name, kind = str(parsed), parsed.type
    if kind == "meta":
        raise ValueError(
            f"device {name!r} holds tensors without values, so the pipeline cannot run on it; use 'cpu' or an"
            " accelerator such as 'cuda'."
        )
    if kind == "cpu":
        return
    if kind == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        raise ValueError(
            f"device {name!r}: this torch ({torch.__version__}) is a build without CUDA; install a CUDA build of"
            " torch, or use 'cpu'."
        )
    backend = torch.backends.mps if kind == "mps" else getattr(torch, kind, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"device {name!r} is not available: torch finds no {kind} device; use 'cpu'.")
    count = getattr(getattr(torch, kind, None), "device_count", None)
    if parsed.index is not None and callable(count) and parsed.index >= count():
        raise ValueError(f"device {name!r} does not exist: torch finds {count()} {kind} device(s).")


def _check_choice(name: str, value, choices, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    try:
        known = value in choices
    except (TypeError, ValueError):  # unhashable (a dict of choices), or an array
        known = False
    if not known:
        raise ValueError(f"{name} must be one of {list(choices)}{' or None' if allow_none else ''}, got {value!r}.")


def _is_real(value, integer: bool = False) -> bool:
    """A real number (an integer if ``integer``), never a bool."""
    return isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)


def _in_range(value, low: float, high: float) -> bool:
    """Whether a real ``value`` is finite and in ``[low, high]`` (an integer too large for a float is not)."""
    try:
        return math.isfinite(value) and low <= value <= high
    except OverflowError:
        return False


def _check_number(name: str, value, low: float = -math.inf, high: float = math.inf, integer: bool = False) -> None:
    """Raise unless ``value`` is a finite real (an integer if ``integer``) in ``[low, high]``."""
    if _is_real(value, integer) and _in_range(value, low, high):
        return
    what = "an integer" if integer else "a number"
    if math.isfinite(high):
        bounds = f"lie in [{low}, {high}]" if not integer else f"be an integer in [{low}, {high}]"
    else:
        bounds = f"be {what} >= {low}"
    raise ValueError(f"{name} must {bounds}, got {value!r}.")


def _check_flag(name: str, value) -> None:
    """Flags are booleans: a string such as "no" or "false" would otherwise read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


def _check_reweight(reweight) -> None:
    """``PromptToPrompt.reweight``: ``{word: factor}`` or a list of such dicts, factors in ±`MAX_REWEIGHT`."""
    weights = [reweight] if isinstance(reweight, dict) else reweight
    if not (isinstance(weights, (list, tuple)) and weights and all(isinstance(w, dict) for w in weights)):
        raise ValueError(
            "PromptToPrompt.reweight must be a dict {word: factor} or a list of them (one per target), got"
            f" {reweight!r}."
        )
    for word, factor in (item for w in weights for item in w.items()):
        if not (isinstance(word, str) and word.strip()):
            raise ValueError(f"PromptToPrompt.reweight words must be non-blank strings, got {word!r}.")
        _check_number(f"PromptToPrompt.reweight factor of {word!r}", factor, -MAX_REWEIGHT, MAX_REWEIGHT)


def _blend_words_problem(words) -> str | None:
    """What makes ``words`` not `LocalBlend.words`, or `None`: a list of word groups (one image: source, targets),
    or of pairs of word groups (one pair per image); a group is a word or a non-empty list of words."""
    if not (isinstance(words, (tuple, list)) and words):
        return "it is not a non-empty tuple or list"
    for entry in words:
        pair = isinstance(entry, (tuple, list)) and len(entry) == 2 and not all(isinstance(w, str) for w in entry)
        problem = next(filter(None, map(_word_group_problem, entry if pair else [entry])), None)
        if problem:
            return problem
    return None


def _word_group_problem(group) -> str | None:
    words = [group] if isinstance(group, str) else group
    if not isinstance(words, (tuple, list)):
        return f"{group!r} is not a word or a list of words"
    if not words:
        return "it holds an empty list of words"
    for word in words:
        if not (isinstance(word, str) and word.strip()):
            return f"{word!r} is not a word"
    return None


def _check_null_text_settings(inner_steps, early_stop, init) -> None:
    _check_number("null_text_inner_steps", inner_steps, 0, integer=True)
    _check_number("null_text_early_stop", early_stop, 0)
    _check_choice("null_text_init", init, ("null", "prompt"))


def _check_steps(num_inference_steps, num_train_timesteps: int) -> None:
    if not _is_real(num_inference_steps, integer=True) or num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be at most the scheduler's {num_train_timesteps} training timesteps, got"
            f" {num_inference_steps}."
        )


def _check_guidance(guidance_scale, method: str) -> None:
    _check_number("guidance_scale", guidance_scale, 0, MAX_GUIDANCE_SCALE)
    if INVERSION_METHODS[method].optimises_null_text and guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 with null-text inversion, got {guidance_scale!r}.")


def _as_prompt_list(prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}.")
    return list(prompts)


def _targets_per_image(prompt, sources: list[str]) -> list[list[str]]:
    """Normalise ``prompt`` to the list of target prompts of each inverted image."""
    if prompt is None:
        return [[source] for source in sources]
    if isinstance(prompt, str):
        return [[prompt] for _ in sources]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
        if len(prompt) != len(sources):
            raise ValueError(f"prompt has target lists for {len(prompt)} images, the inversion holds {len(sources)}.")
        return [_as_prompt_list(p, "prompt") for p in prompt]
    prompts = _as_prompt_list(prompt, "prompt")
    if len(sources) == 1:
        return [prompts]
    if len(prompts) != len(sources):
        raise ValueError(
            f"prompt has {len(prompts)} prompts for {len(sources)} inverted images; give one per image, or a list of"
            " target lists."
        )
    return [[p] for p in prompts]


# diffusers' call arguments that mean nothing for an edit of an inversion: the value that is harmless (None: only
# leaving it out is), and what to do instead.
_UNUSED_ARGUMENTS = {
    "generator": (
        None,
        "inversion and editing are deterministic DDIM (η = 0), so the same call always returns the"
        " same images; there is nothing to seed",
    ),
    "image": (
        None,
        "invert the image first, inversion = pipe.invert(image, source_prompt), then edit it with"
        " pipe(prompt=..., inversion=inversion)",
    ),
    "num_images_per_prompt": (
        1,
        "editing is deterministic, so the images would be identical; give several target"
        " prompts (prompt=[...]) to get several edits in one batch",
    ),
    "latents": (
        None,
        "an edit starts from the inversion's z_T (inversion.latents[:, -1]); invert the image you want"
        " to start from instead",
    ),
    "eta": (
        0,
        "inversion and editing are deterministic DDIM (η = 0), the only sampler that retraces an inversion;"
        " leave eta unset",
    ),
}


def _refuse_unused_arguments(**values) -> None:
    for name, value in values.items():
        harmless, instead = _UNUSED_ARGUMENTS[name]
        if value is not None and (harmless is None or value != harmless):
            raise ValueError(f"{name} is not used by an edit: {instead}.")


def _edited_as(inversion: InversionResult, method: str | None) -> InversionResult:
    """``inversion`` edited as ``method`` (a call's ``inversion_method``). NPI, DDIM and Direct Inversion regenerate
    from the stored DDIM trajectory alone, which every inversion holds (NTI's too), so each edits any inversion;
    NTI needs the null text it optimised."""
    if method is None or method == inversion.method:
        return inversion
    _check_choice("inversion_method", method, INVERSION_METHODS)
    if INVERSION_METHODS[method].optimises_null_text:
        raise ValueError(
            f"inversion_method={method!r} edits with the null text that null-text inversion optimises, and this"
            f" inversion is {inversion.method!r}: invert the image with inversion_method={method!r}."
        )
    return replace(inversion, method=method, null_embeds=None, null_text_losses=None, null_pooled_embeds=None)


def _edit_prompts(
    prompt,
    prompt_embeds,
    pooled_prompt_embeds,
    negative_prompt,
    negative_prompt_embeds,
    negative_pooled_prompt_embeds,
    inversion: InversionResult,
    attention_control,
) -> tuple[list[list], list | None, dict]:
    """The targets of each image (text, or `_GivenEmbedding` rows of ``prompt_embeds``), each target's negative
    prompt in output order (`None`: not given), and the given embeddings' rows by key."""
    sources = inversion.source_prompts
    if prompt_embeds is None:
        if pooled_prompt_embeds is not None:
            raise ValueError("pooled_prompt_embeds comes with prompt_embeds (SDXL), which is not given.")
        targets = _targets_per_image(prompt, sources)
        given = {}
    else:
        if prompt is not None:
            raise ValueError("Give the targets as prompt or as prompt_embeds, not both.")
        if getattr(attention_control, "reads_words", False):
            raise ValueError(
                "prompt-to-prompt aligns each target's words with its source prompt's, so it needs the targets as"
                " text: pass prompt=..., not prompt_embeds."
            )
        given = _given_embeddings("prompt_embeds", prompt_embeds, pooled_prompt_embeds, inversion)
        targets = _embedded_targets(list(given), len(sources))
    count = sum(map(len, targets))
    if negative_prompt_embeds is None:
        if negative_pooled_prompt_embeds is not None:
            raise ValueError(
                "negative_pooled_prompt_embeds comes with negative_prompt_embeds (SDXL), which is not given."
            )
        if negative_prompt is None:
            return targets, None, given
        negatives = [negative_prompt] * count if isinstance(negative_prompt, str) else negative_prompt
        if not (
            isinstance(negatives, (list, tuple))
            and len(negatives) == count
            and all(isinstance(n, str) for n in negatives)
        ):
            raise ValueError(
                f"negative_prompt must be a string or a list of {count} strings (one per target), got {negative_prompt!r}."
            )
        return targets, list(negatives), given
    if negative_prompt is not None:
        raise ValueError("Give negative_prompt or negative_prompt_embeds, not both.")
    negative = _given_embeddings(
        "negative_prompt_embeds", negative_prompt_embeds, negative_pooled_prompt_embeds, inversion
    )
    if len(negative) not in (1, count):
        raise ValueError(
            f"negative_prompt_embeds has {len(negative)} rows for {count} targets; give one row (for every target)"
            " or one per target."
        )
    return targets, list(negative) * (count // len(negative)), {**given, **negative}


def _given_embeddings(name: str, embeds, pooled, inversion: InversionResult) -> dict:
    """The rows of an embedding argument (with, on SDXL, its pooled companion) by `_GivenEmbedding`, checked against
    the inversion's E(source): the text encoders' output shapes."""
    pooled_name = name.replace("prompt_embeds", "pooled_prompt_embeds")
    tokens, dim = inversion.prompt_embeds.shape[1:]
    if not (
        isinstance(embeds, torch.Tensor)
        and embeds.dtype.is_floating_point
        and embeds.dim() == 3
        and len(embeds) > 0
        and tuple(embeds.shape[1:]) == (tokens, dim)
    ):
        raise ValueError(f"{name} must be a floating-point tensor (n, {tokens}, {dim}), got {_describe(embeds)}.")
    sdxl_pooled = inversion.pooled_prompt_embeds
    if sdxl_pooled is None and pooled is not None:
        raise ValueError(f"{pooled_name} belongs to SDXL (text_encoder_2's pooled embedding); this is SD 1.x/2.x.")
    if sdxl_pooled is not None:
        width = sdxl_pooled.shape[1]
        if not (
            isinstance(pooled, torch.Tensor)
            and pooled.dtype.is_floating_point
            and tuple(pooled.shape) == (len(embeds), width)
        ):
            raise ValueError(
                f"On SDXL {name} needs {pooled_name}, text_encoder_2's pooled embedding of the same prompts"
                f" ({len(embeds)}, {width}); got {_describe(pooled)}."
            )
    if not all(bool(torch.isfinite(tensor).all()) for tensor in (embeds, pooled) if tensor is not None):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return {_GivenEmbedding(name, k): (embeds[k], _row(pooled, k)) for k in range(len(embeds))}


def _embedded_targets(keys: list, num_images: int) -> list[list]:
    """``prompt_embeds`` rows as the targets of each image, as `_targets_per_image` spreads a list of prompts."""
    if len(keys) == 1:
        return [keys for _ in range(num_images)]
    if num_images == 1:
        return [keys]
    if len(keys) == num_images:
        return [[key] for key in keys]
    raise ValueError(f"prompt_embeds has {len(keys)} rows for {num_images} inverted images; give one per image.")


def _check_negative_prompt_is_read(branches: list[Branch], method_name: str) -> None:
    """A negative prompt steers null-guided targets: refuse one that no target of the call reads."""
    targets = [branch for branch in branches if not branch.is_source]
    if any(branch.uncond == "negative" and not branch.pinned for branch in targets):
        return
    edited = [branch for branch in targets if not branch.reconstructs]
    method = INVERSION_METHODS[method_name]
    if not edited:
        reason = f"every target reconstructs its image, which under {method_name!r} reads no negative prompt"
    elif method.null != "negative":
        reason = (
            f"{method_name!r} guides its targets against {_UNCOND_NAMES[method.null]}; edit with"
            " inversion_method='direct' (or invert with 'npi') to steer them against a negative prompt"
        )
    else:
        reason = (
            f"{method_name!r} guides these targets against {_UNCOND_NAMES[edited[0].uncond]}; pass"
            " target_guidance='null' to steer them against the negative prompt"
        )
    raise ValueError(
        f"negative_prompt (or negative_prompt_embeds) is what null-guided targets are steered against, and no"
        f" target of this call is null-guided: {reason}."
    )


def _blend_words_per_branch(branches: list[Branch], blend_words, num_images: int) -> list[list[str]]:
    """Spread ``blend_words`` over the branches.

    One image: ``(source_words, target_words)`` (target words for every target) or ``[source_words,
    target_1_words, …]``. Any number of images: a list with one ``(source_words, target_words)`` pair per image.
    Words are a string or a list of strings.
    """
    as_list = lambda words: [words] if isinstance(words, str) else list(words)  # noqa: E731
    usage = (
        "LocalBlend words must be (source_words, target_words) or [source_words, target_1_words, …] for one image,"
        f" or one (source_words, target_words) pair per image; got {blend_words!r}."
    )
    if not isinstance(blend_words, (tuple, list)):
        raise ValueError(usage)
    targets_per_image = [sum(1 for b in branches if b.image == i and not b.is_source) for i in range(num_images)]
    if num_images == 1 and len(blend_words) in (2, 1 + targets_per_image[0]):
        per_image = [[as_list(blend_words[0])] + [as_list(w) for w in blend_words[1:]]]
        if len(blend_words) == 2:
            per_image = [[per_image[0][0]] + per_image[0][1:] * targets_per_image[0]]
    elif len(blend_words) == num_images and all(
        isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in blend_words
    ):
        per_image = [[as_list(src)] + [as_list(tgt)] * n for (src, tgt), n in zip(blend_words, targets_per_image)]
    else:
        raise ValueError(usage)
    words, used = [], [0] * num_images
    for branch in branches:
        if branch.is_source:
            words.append(per_image[branch.image][0])
        else:
            used[branch.image] += 1
            words.append(per_image[branch.image][used[branch.image]])
    return words


def _piece_texts(tokenizer, prompt: str) -> list[str]:
    """The BPE pieces of ``prompt`` (no BOS / EOS) without CLIP's word-end marker."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return [piece.removesuffix("</w>") for piece in tokenizer.convert_ids_to_tokens(ids)]


def _per_target(value, count: int, name: str) -> list:
    if value is None or isinstance(value, dict):
        return [value] * count
    if isinstance(value, (list, tuple)) and len(value) == count and all(isinstance(v, dict) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a dict or a list of {count} dicts (one per target), got {value!r}.")


_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike)
_IMAGE_USAGE = (
    "image must be a PIL image, an image file's path, a numpy array (HWC or NHWC), a torch tensor (CHW or NCHW), or a"
    " non-empty list of them"
)


def _as_image_list(image) -> list:
    if isinstance(image, (PIL.Image.Image, str, os.PathLike)):
        images = [image]
    elif isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3, 4):
        images = list(image) if image.ndim == 4 else [image]
    elif isinstance(image, (list, tuple)) and image and all(isinstance(i, _IMAGE_TYPES) for i in image):
        images = list(image)
    else:
        raise TypeError(f"{_IMAGE_USAGE}; got {type(image).__name__}.")
    missing = [os.fspath(i) for i in images if isinstance(i, (str, os.PathLike)) and not os.path.isfile(i)]
    if missing:
        raise ValueError(f"{_IMAGE_USAGE}; there is no file {missing[0]!r}.")
    return images


def _image_to_tensor(image) -> torch.Tensor:
    """One image → ``(1, 3, H, W)`` float32 in [0, 1]: the one decoder of files, PIL images, arrays and tensors.

    A file is read as `diffusers.utils.load_image` reads it (EXIF orientation applied); integer pixels are scaled by
    their type's full range (16-bit images keep it); an alpha channel, or a palette's transparent colour, is
    composited over white (with a warning when any pixel is transparent).
    """
    if isinstance(image, (str, os.PathLike)):
        return _read_image_file(image)
    if isinstance(image, PIL.Image.Image):
        image = _pil_to_array(image)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(_array_to_unit_range(image))
        image = image[..., None] if image.ndim == 2 else image
        image = image.permute(2, 0, 1)
    elif image.dtype == torch.uint8:
        image = image / 255.0
    image = image.float()
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"image must have 1–4 channels (CHW tensors, HWC arrays), got shape {tuple(image.shape)}.")
    if 0 in image.shape[1:]:
        raise ValueError(f"image has no pixels (height × width = {image.shape[1]} × {image.shape[2]}).")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values.")
    if image.min() < 0 or image.max() > 1:
        raise ValueError("image values must lie in [0, 1] (uint8 arrays are divided by 255, uint16 by 65535).")
    if image.shape[0] in (2, 4):  # grey + alpha, RGB + alpha
        image = _over_white(image[:-1], image[-1:])
    return image.expand(3, -1, -1)[None].contiguous()


def _read_image_file(path) -> torch.Tensor:
    try:
        with PIL.Image.open(path) as image:
            array = _pil_to_array(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:  # what PIL raises per format
        raise ValueError(f"image: cannot read {os.fspath(path)!r} ({error}).") from error
    return _image_to_tensor(array)


def _pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """PIL → HWC array, upright as its EXIF orientation says (as `diffusers.utils.load_image`), with the pixel
    type's full range intact (``convert("RGB")`` clips 16-bit images to 255)."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image)
        # mode "I" holds 16-bit PNGs on older Pillow; its values are 16-bit, stored in int32
        return array.astype(np.uint16) if image.mode == "I" and 0 <= array.min() and array.max() <= 65535 else array
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))


def _array_to_unit_range(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.uint16 or array.dtype == np.dtype(">u2"):
        return array.astype(np.float32) / 65535
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(array, dtype=np.float32)
    raise ValueError(f"image arrays must be uint8, uint16, bool or floating point in [0, 1], got {array.dtype}.")


def _over_white(colour: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # Porter–Duff "over" onto an opaque white background: c·α + 1·(1 − α)
    if (alpha < 1).any():
        logger.warning("image has transparent pixels; they are composited over white before inversion.")
    return colour * alpha + (1 - alpha)


def _resize(image: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    if mode == "crop":  # crop first, so memory follows the output's size, never the input's aspect ratio
        image = _centre_crop(image, height, width)
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _centre_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred region of ``image`` with the aspect ratio ``height : width``, whole pixels."""
    rows, cols = image.shape[-2:]
    if rows * width > cols * height:  # taller than the output: cut rows
        rows = max(1, round(cols * height / width))
    else:
        cols = max(1, round(rows * width / height))
    top, left = (image.shape[-2] - rows) // 2, (image.shape[-1] - cols) // 2
    return image[..., top : top + rows, left : left + cols]


def _ensure_finite(tensor: torch.Tensor, what: str, model: torch.nn.Module) -> torch.Tensor:
    """Never return NaN/inf silently. Inputs are checked up front (finite, within range), so what is left to name is
    the model: weights that are not finite, an overflow of float16, or else values it was handed mid-call."""
    if torch.isfinite(tensor).all():
        return tensor
    dtype, kind = next(model.parameters()).dtype, type(model).__name__
    broken = next((name for name, weight in model.named_parameters() if not torch.isfinite(weight).all()), None)
    if broken is not None:
        cause = f"the {kind}'s weight {broken} holds NaN or inf; load finite weights"
    elif dtype == torch.float16:
        cause = f"the {kind} overflowed float16 (largest value 65504); run it in bfloat16 or float32" + (
            " (SDXL's VAE: upcast it, or use the fp16-fixed VAE)" if "Autoencoder" in kind else ""
        )
    else:
        cause = (
            f"the {kind} runs in {dtype}, whose range (±{torch.finfo(dtype).max:.1e}) it does not overflow, with"
            " finite weights and inputs that were checked to be finite; a value replaced during the call (such as"
            " latents returned by callback_on_step_end) is the likely cause"
        )
    raise FloatingPointError(f"{what} contain NaN or inf: {cause}.")


def _index(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)


def _row(tensor: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """Row ``index`` of an optional per-sample tensor (SDXL's pooled embeddings, NTI's null embeddings)."""
    return None if tensor is None else tensor[index]


def _expand_rows(tensor: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if tensor is None else tensor.expand(rows, *tensor.shape[1:])


def _on_cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


def _masks_to_images(fraction: torch.Tensor, image_size: tuple[int, int]) -> list[PIL.Image.Image]:
    """Edit-mask fractions ``(n, 1, h, w)`` → grey PIL images at the image size (white = edited)."""
    upsampled = F.interpolate(fraction.float().cpu(), size=image_size, mode="nearest")
    return [PIL.Image.fromarray((m[0].clamp(0, 1) * 255).round().byte().numpy(), mode="L") for m in upsampled]
