# Copyright 2026 The NegativePromptInversionPipeline authors. Licensed under the Apache License, Version 2.0.
"""Real-image editing with Stable Diffusion: invert a photo, then regenerate it under a new prompt.

    inversion = pipe.invert(image, "a cat sitting on a wall")          # DDIM inversion (+ null-text optimisation)
    edited = pipe(prompt="a dog sitting on a wall", inversion=inversion).images[0]

Inversion methods (constructor flag ``inversion_method``, overridable per call):

- ``"npi"``  negative-prompt inversion (Miyake et al. 2023): the source prompt's embedding is the unconditional
  embedding, the closed-form solution of null-text inversion. No optimisation; reconstruction costs one UNet pass.
- ``"nti"``  null-text inversion (Mokady et al. 2023): one optimised unconditional embedding per step.
- ``"ddim"`` plain DDIM inversion; regeneration uses the empty prompt as unconditional embedding.

Editing: plain guidance, prompt-to-prompt attention control (word swap, refinement, re-weighting, local blend),
mutual self-attention control (MasaCtrl), and proximal guidance (ProxEdit, Han et al. 2023), all from one
inversion. Equations follow ``ALGORITHMS`` in the project's reference notes; each formula below names its source.
"""

import hashlib
import inspect
import json
import math
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import DDIMScheduler, KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging

# Each leaf is imported on its own: diffusers' custom-pipeline loader copies exactly these files. The fallback
# serves copy-paste use, where this file is a top-level module next to the ``attention_processors`` folder.
try:
    from .attention_processors.npi_attention_store import AttentionStore, heat_map_grid, local_blend_mask
    from .attention_processors.npi_controlled_attention import ControlledAttnProcessor
    from .attention_processors.npi_mutual_self_attention import MutualSelfAttention
    from .attention_processors.npi_prompt_to_prompt import (
        CrossAttentionControl,
        SelfAttentionReplace,
        cross_attention_window,
        find_word,
        refinement,
        reweighting,
        self_attention_window,
        stack_edits,
        word_swap,
    )
except ImportError:
    from attention_processors.npi_attention_store import AttentionStore, heat_map_grid, local_blend_mask
    from attention_processors.npi_controlled_attention import ControlledAttnProcessor
    from attention_processors.npi_mutual_self_attention import MutualSelfAttention
    from attention_processors.npi_prompt_to_prompt import (
        CrossAttentionControl,
        SelfAttentionReplace,
        cross_attention_window,
        find_word,
        refinement,
        reweighting,
        self_attention_window,
        stack_edits,
        word_swap,
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

INVERSION_METHODS = ("npi", "nti", "ddim")
PROXIMAL_MODES = ("soft", "hard")
ATTENTION_CONTROLS = ("p2p", "masactrl")
EDIT_TYPES = ("replace", "refine")
INVERSION_FORMAT = "negative-prompt-inversion/1"

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
        ...     torch_dtype=torch.float16,
        ... ).to("cuda")
        >>> image = load_image("cat.png")
        >>> inversion = pipe.invert(image, "a cat sitting on a wall")
        >>> edited = pipe(
        ...     prompt="a dog sitting on a wall",
        ...     inversion=inversion,
        ...     cross_replace_steps=0.4,
        ...     self_replace_steps=0.6,
        ...     blend_words=("cat", "dog"),
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
        threshold = torch.full((len(direction), *[1] * (direction.dim() - 1)), float(threshold), device=direction.device)
    operator = soft_threshold if mode == "soft" else hard_threshold
    return operator(direction, threshold), threshold


def edit_region(direction: torch.Tensor, threshold: torch.Tensor, dilation: int) -> torch.Tensor:
    # ProxEdit §3.3: the edit mask M = [|prox(d)| > λ] per channel, dilated by a (2r+1)² max-pool
    mask = (direction.abs() > threshold).float()
    if dilation > 0:
        mask = F.max_pool2d(mask, kernel_size=2 * dilation + 1, stride=1, padding=dilation)
    return mask


def guide_towards(latents: torch.Tensor, anchor: torch.Tensor, region: torch.Tensor, step_size: float):
    # ProxEdit §3.3 inversion guidance (anchor = z*_{t−1}) and App. B reconstruction guidance (anchor = z*_0):
    # z ← z − η·(z − anchor)·(1 − M), with ``region`` = 1 − M
    return latents - step_size * (latents - anchor) * region


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


_TENSOR_NAMES = ("latents", "prompt_embeds", "timesteps", "null_embeds", "null_text_losses")
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
        method (`str`): ``"npi"``, ``"nti"`` or ``"ddim"``; for NPI and DDIM the unconditional embedding is a rule
            (E(source) resp. E("")), for NTI it is ``null_embeds``.
        guidance_scale (`float`): Guidance scale the inversion was prepared for (NTI optimises for it).
        image_size (`tuple[int, int]`): ``(height, width)`` in pixels after preprocessing.
        null_embeds (`torch.Tensor` of shape `(batch, steps, tokens, dim)`, *optional*):
            NTI's optimised unconditional embedding for each denoising step.
        null_text_losses (`torch.Tensor` of shape `(batch, steps, inner_steps)`, *optional*):
            NTI's loss before each inner optimisation step (NaN after early stopping).
        model_signature (`dict`): Fingerprint of the models that produced the inversion.
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

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def __len__(self) -> int:
        return len(self.source_prompts)

    def __getitem__(self, index: int) -> "InversionResult":
        """The inversion of one image of the batch."""
        pick = slice(index, index + 1) if index >= 0 else slice(index, index + 1 or None)
        optional = lambda tensor: None if tensor is None else tensor[pick]  # noqa: E731
        return InversionResult(
            latents=self.latents[pick],
            prompt_embeds=self.prompt_embeds[pick],
            source_prompts=self.source_prompts[pick],
            timesteps=self.timesteps,
            method=self.method,
            guidance_scale=self.guidance_scale,
            image_size=self.image_size,
            null_embeds=optional(self.null_embeds),
            null_text_losses=optional(self.null_text_losses),
            model_signature=self.model_signature,
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: getattr(self, name) for name in _TENSOR_NAMES if getattr(self, name) is not None}
        return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.safetensors`` file whose header carries the JSON metadata and a SHA-256 of every tensor."""
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):  # safetensors would only report a temporary file it could not create
            raise FileNotFoundError(f"Cannot save the inversion to {os.fspath(path)}: no folder {folder}.")
        self._check_consistency(f"inversion to save as {os.fspath(path)}")  # never write a file `load` rejects
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
        save_file(tensors, os.fspath(path), metadata={"inversion": json.dumps(metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InversionResult":
        """Read a file written by `save`. safetensors holds only tensors, so loading can never run code.

        The checksum only catches accidents (anyone can recompute it), so the content is validated as well; every
        problem raises `InvalidInversionError` naming the file.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No inversion file at {path}.")
        try:
            with safe_open(path, framework="pt") as handle:
                header = handle.metadata() or {}
            tensors = load_file(path)
            metadata = json.loads(header["inversion"])
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
            problems.append(f"method {self.method!r} is not one of {INVERSION_METHODS}")
        if not (_is_number(scale) and math.isfinite(scale)):
            problems.append(f"guidance_scale must be a finite number, got {scale!r}")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(n) and n > 0 for n in size)):
            problems.append(f"image_size must be two positive integers, got {size!r}")
        if not isinstance(self.model_signature, dict):
            problems.append("model_signature must be a dict")
        return problems

    def _tensor_problems(self, vae_scale_factor: int | None) -> list[str]:
        present = {name: getattr(self, name) for name in _TENSOR_NAMES if getattr(self, name) is not None}
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
            + self._image_size_problems(vae_scale_factor)
        )

    def _shape_problems(self, present: dict[str, torch.Tensor]) -> list[str]:
        batch, steps, embedding = len(self.source_prompts), len(self.timesteps), tuple(self.prompt_embeds.shape[1:])
        patterns = {  # None: any size
            "latents": (batch, steps + 1, None, None, None),
            "prompt_embeds": (batch, None, None),
            "timesteps": (steps,),
            "null_embeds": (batch, steps, *embedding),
            "null_text_losses": (batch, steps, None),
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
        nti = self.method == "nti"
        if nti != ("null_embeds" in present) or ("null_text_losses" in present and not nti):
            return [f"null_embeds (with null_text_losses) belong to method 'nti' only, method is {self.method!r}"]
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
# Batch layout


@dataclass
class _Branch:
    """One latent being denoised: a source (reconstruction that drives attention control) or a target."""

    image: int
    source_prompt: str
    prompt: str
    is_source: bool
    uncond: Literal["source", "empty", "null_text"]  # E(source prompt), E(""), or NTI's U[i]
    controlled: bool
    cond_row: int = -1
    uncond_row: int = -1

    def needs_uncond_row(self, guidance_scale: float) -> bool:
        # At w = 1 the unconditional prediction cancels; and when the unconditional pass would repeat the
        # conditional one (NPI: same latent, same embedding E(src), no control) it is the same computation.
        same_pass = self.uncond == "source" and self.prompt == self.source_prompt and not self.controlled
        return guidance_scale != 1 and not same_pass


def _lay_out_rows(branches: list[_Branch], guidance_scale: float) -> int:
    """Assign UNet batch rows: unconditional rows first, then one conditional row per branch. Returns the count."""
    uncond = [branch for branch in branches if branch.needs_uncond_row(guidance_scale)]
    for row, branch in enumerate(uncond):
        branch.uncond_row = row
    for row, branch in enumerate(branches, start=len(uncond)):
        branch.cond_row = row
        if branch.uncond_row < 0:
            branch.uncond_row = row
    return len(uncond) + len(branches)


def _row_indices(branches: list[_Branch], num_rows: int, device):
    """Index tensors: the branch each UNet row denoises, and each branch's conditional / unconditional row."""
    row_branch = [0] * num_rows
    for k, branch in enumerate(branches):
        row_branch[branch.cond_row] = row_branch[branch.uncond_row] = k
    cond_rows = _index([branch.cond_row for branch in branches], device)
    uncond_rows = _index([branch.uncond_row for branch in branches], device)
    return _index(row_branch, device), cond_rows, uncond_rows


@dataclass
class _Control:
    """One call's attention control. ``processors`` (by layer name), ``step`` and ``store`` are what the UNet reads,
    so captured graphs hold on to them; ``blend`` (local blend settings) is read by the denoising loop."""

    processors: dict = field(default_factory=dict)
    step: torch.Tensor | None = None  # 0-dim step index the rules read their per-step switches with
    store: AttentionStore | None = None
    blend: dict | None = None

    def state(self) -> tuple[tuple, list[torch.Tensor]]:
        """``(structure, tensors)``: two controls of equal structure differ only in their tensors' values."""
        tensors, seen = [], {}

        def walk(value):
            if id(value) in seen:
                return ("same as", seen[id(value)][0])
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            seen[id(value)] = (len(seen), value)  # keeps temporaries alive, so ids stay unique
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return ("tensor", tuple(value.shape), value.dtype, str(value.device))
            if isinstance(value, dict):
                return tuple((key, walk(item)) for key, item in value.items())
            if isinstance(value, (list, tuple)):
                return tuple(walk(item) for item in value)
            if inspect.isroutine(value):
                return value.__module__, value.__qualname__
            return type(value).__qualname__, walk(vars(value))

        structure = walk({"processors": self.processors, "step": self.step, "store": self.store})
        return structure, tensors


class _CUDAGraphUNet:
    """The UNet forward replayed as CUDA graphs, kept across calls (optionally compiled first).

    One graph per input shape, attention-control structure and model state, captured right after an eager call
    that computes that step for real. Rules read their per-step switches from device tensors, so one graph serves
    every step. Graphs read the control's tensors in place: a later call whose control has the same structure
    therefore gets the earlier control objects back with its own values copied in (`adopt`), and replays the same
    graphs; nothing is recaptured or recompiled. Non-CUDA inputs run eagerly.
    """

    max_graphs = 8  # least recently used graphs beyond this are released

    def __init__(self, unet, compile: bool = False):
        self.unet, self.compile = unet, compile
        # dynamic=False: one static kernel set per batch size instead of a slower dynamic-shape one
        self.forward = torch.compile(unet, dynamic=False) if compile else unet
        self.graphs = OrderedDict()
        self.controls = {}  # structure -> (control, its tensors)
        self.key = None

    def adopt(self, control: _Control) -> _Control:
        """The control to install: the first one seen with this structure, holding ``control``'s values."""
        structure, tensors = control.state()
        kept, kept_tensors = self.controls.setdefault(structure, (control, tensors))
        if kept is not control:
            for mine, theirs in zip(kept_tensors, tensors):
                mine.copy_(theirs)
            kept.blend = control.blend
        return kept

    def refresh_key(self) -> None:
        """Key the next graphs on the installed processors and the weights' storage (a moved, cast or re-adapted
        UNet must not replay graphs that read the old tensors)."""
        processors = tuple(id(processor) for processor in self.unet.attn_processors.values())
        self.key = (processors, tuple(parameter.data_ptr() for parameter in self.unet.parameters()))

    def _forward(self, module, latents, timestep, embeds):
        return module(latents, timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def __call__(self, latents, timestep, embeds):
        if not latents.is_cuda:
            return self._forward(self.unet, latents, timestep, embeds)
        key = (self.key, tuple(latents.shape), tuple(embeds.shape), latents.dtype)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            graph, static = self.graphs[key]
            static["latents"].copy_(latents)
            static["timestep"].copy_(timestep)
            static["embeds"].copy_(embeds)
            graph.replay()
            return static["output"].clone()
        static = {"latents": latents.clone(), "timestep": timestep.clone(), "embeds": embeds.clone()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = self._forward(self.forward, static["latents"], static["timestep"], static["embeds"])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static["output"] = self._forward(self.forward, static["latents"], static["timestep"], static["embeds"])
        self.graphs[key] = (graph, static)
        if len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return output


# =================================================================================================================
# The pipeline


class NegativePromptInversionPipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    FromSingleFileMixin,
):
    r"""Invert real images with negative-prompt, null-text or DDIM inversion, then reconstruct or edit them.

    Constructor flags are stored in the pipeline config (they survive `save_pretrained` / `from_pretrained` and can
    be passed to `from_pretrained`); `invert` and `__call__` accept per-call overrides.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor:
            The Stable Diffusion components. Any scheduler works: its noise schedule is used through a DDIM
            scheduler built from its config (DDIM is the deterministic sampler every inversion method assumes).
        inversion_method (`str`, defaults to `"npi"`): ``"npi"``, ``"nti"`` or ``"ddim"``.
        null_text_inner_steps (`int`, defaults to 10): NTI optimisation steps per timestep.
        null_text_early_stop (`float`, defaults to 1e-5): NTI stops a timestep once its loss falls below
            ``early_stop + 2e-5·i`` (i = step index), as the reference.
        null_text_init (`str`, defaults to `"prompt"`): initialise NTI from E(source) (``"prompt"``: starts at the
            NPI solution; on the toy model it reconstructs slightly better than ``"null"`` with 2.6× fewer inner
            steps, and on SD 1.5 it inverts in 5.6 s instead of 42 s on an H100) or from E("") (``"null"``, the
            paper's choice).
        proximal_guidance (`str`, *optional*): ``"soft"`` or ``"hard"`` thresholding of the guidance direction
            (ProxEdit); `None` for plain guidance.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
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
        requires_safety_checker: bool = False,
        inversion_method: str = "npi",
        null_text_inner_steps: int = 10,
        null_text_early_stop: float = 1e-5,
        null_text_init: str = "prompt",
        proximal_guidance: str | None = None,
    ):
        super().__init__()
        safety_checker = _optional_component("safety_checker", safety_checker)
        feature_extractor = _optional_component("feature_extractor", feature_extractor)
        _check_choice("inversion_method", inversion_method, INVERSION_METHODS)
        _check_choice("null_text_init", null_text_init, ("null", "prompt"))
        _check_choice("proximal_guidance", proximal_guidance, PROXIMAL_MODES, allow_none=True)
        if not (isinstance(null_text_inner_steps, int) and null_text_inner_steps >= 0):
            raise ValueError(f"null_text_inner_steps must be an integer >= 0, got {null_text_inner_steps!r}.")
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("A safety_checker needs a feature_extractor; pass safety_checker=None to disable it.")
        if scheduler is not None and not isinstance(scheduler, DDIMScheduler):
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
        )
        self.register_to_config(
            requires_safety_checker=requires_safety_checker,
            inversion_method=inversion_method,
            null_text_inner_steps=null_text_inner_steps,
            null_text_early_stop=null_text_early_stop,
            null_text_init=null_text_init,
            proximal_guidance=proximal_guidance,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

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

    # -------------------------------------------------------------------------------------------------------------
    # Building blocks

    def encode_text(self, prompts: list[str], device) -> torch.Tensor:
        """E(p) for each prompt: the text encoder's last hidden state over 77 padded tokens."""
        if isinstance(self, TextualInversionLoaderMixin):
            prompts = self.maybe_convert_prompt(prompts, self.tokenizer)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=self.unet.dtype, device=device)

    def _encode_unique(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        unique = list(dict.fromkeys(prompts))
        return dict(zip(unique, self.encode_text(unique, device))) if unique else {}

    def prepare_images(self, image, height: int | None, width: int | None, resize_mode: str) -> torch.Tensor:
        """Images → ``(batch, 3, height, width)`` in [-1, 1].

        Accepts PIL images, numpy arrays (HWC / NHWC, uint8 or float in [0, 1]) and tensors (CHW / NCHW in [0, 1]),
        one or a list. The output size defaults to the model's native square size; both sides must be multiples of
        the VAE factor (8 for Stable Diffusion). ``resize_mode="crop"`` (default, the reference preprocessing)
        scales to cover the output and centre-crops; ``"stretch"`` resizes without keeping the aspect ratio.
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
        """z_0 = E(x): the posterior *mean* times the VAE scaling factor (ALGORITHMS §0), float32."""
        device = self._execution_device
        posterior = self.vae.encode(images.to(device=device, dtype=self.vae.dtype)).latent_dist
        latents = posterior.mean.float()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def ddim_schedule(self, num_inference_steps: int, device):
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

    def enable_cuda_graphs(self, compile: bool = False) -> None:
        """Replay the UNet as CUDA graphs inside `invert` and `__call__` (CUDA only; off by default).

        The stock UNet is launch-bound on fast GPUs; a replayed graph removes the per-kernel launch cost. Graphs are
        kept across calls (up to 8, least recently used released first): the first call with a new batch size or
        kind of attention control captures one after an eager step, later calls replay it. Attention control stays
        exact because its per-step switches live in device tensors. NTI's gradient passes always run eagerly.

        Args:
            compile (`bool`, defaults to False): Also compile the UNet with `torch.compile` (inductor, static
                shapes) before capturing. The first call per batch size and kind of control then takes about
                1–1.5 min to compile; afterwards each UNet step takes ~45% less time (H100). A channels-last UNet
                (``pipe.unet.to(memory_format=torch.channels_last)``) is faster still.
        """
        self._cuda_graphs = _CUDAGraphUNet(self.unet, compile)

    def disable_cuda_graphs(self) -> None:
        """Run the UNet eagerly again and release the captured graphs."""
        self._cuda_graphs = None

    @contextmanager
    def _controlled_unet(self, control: _Control):
        """Install ``control``'s processors over the user's for the duration (always restoring the user's), and
        yield the control the loop must use: with CUDA graphs on, an earlier control of the same structure holding
        this call's values, so the graphs captured with it replay."""
        runner = getattr(self, "_cuda_graphs", None)
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

    def predict_noise(self, latents, timestep, embeds, alpha) -> torch.Tensor:
        """ε(z, t, c) in float32, converted from v-prediction when the model predicts v."""
        runner = getattr(self, "_cuda_graphs", None)
        if runner is not None and not torch.is_grad_enabled():
            output = runner(latents.to(self.unet.dtype), timestep, embeds)
        else:
            output = self.unet(latents.to(self.unet.dtype), timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        output = output.float()
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type == "v_prediction":
            return v_prediction_to_noise(output, latents.float(), alpha)
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type {prediction_type!r} is not supported (use 'epsilon' or 'v_prediction').")
        return output

    def model_signature(self) -> dict:
        """Fingerprint of the models an inversion depends on: architecture configs exactly, a few weights approximately.

        It identifies what the weights compute, so the same weights saved, reloaded or cast to another dtype match.
        """

        def probe(module) -> list[float]:
            return [float(v) for v in next(module.parameters()).detach().flatten()[:8].float().cpu()]

        configs = {
            "unet": dict(self.unet.config),
            "vae": dict(self.vae.config),
            "text_encoder": self.text_encoder.config.to_diff_dict() if hasattr(self.text_encoder.config, "to_diff_dict") else {},
        }
        digest = hashlib.sha256(
            json.dumps({name: _architecture_config(config) for name, config in configs.items()},
                       sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        return {
            "config": digest,
            "probe": {name: probe(getattr(self, name)) for name in ("unet", "vae", "text_encoder")},
        }

    def check_inversion(self, inversion: "InversionResult", num_inference_steps: int | None = None) -> InversionResult:
        """Raise if ``inversion`` is malformed or was made by other models or with another step count than asked for.

        Returns it as this file's `InversionResult` (see `_as_inversion_result`).
        """
        inversion = _as_inversion_result(inversion)
        inversion._check_consistency("inversion", self.vae_scale_factor)
        if num_inference_steps is not None and num_inference_steps != inversion.num_inference_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} but the inversion was made with"
                f" {inversion.num_inference_steps} steps; invert again with the step count you want."
            )
        mine, theirs = self.model_signature(), inversion.model_signature
        their_probes = theirs.get("probe")
        same_probe = isinstance(their_probes, dict) and all(
            _same_weights(probe, their_probes.get(name)) for name, probe in mine["probe"].items()
        )
        if mine["config"] != theirs.get("config") or not same_probe:
            raise ValueError(
                "This inversion was made with different models (UNet, VAE or text encoder) than this pipeline's;"
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

    def attention_layers(self, latent_size: tuple[int, int]) -> list[dict]:
        """The UNet's attention layers in call order with their map size for a latent of ``latent_size``.

        Each entry: ``name``, ``cross`` (bool), ``level`` (number of 2× downsamplings), ``size`` (h, w) and
        ``block`` (index among the transformer blocks, in call order).
        """
        levels = len(self.unet.config.down_block_types)
        sizes = [tuple(latent_size)]
        for _ in range(levels - 1):
            sizes.append(tuple(math.ceil(s / 2) for s in sizes[-1]))
        layers = []
        for name in self.unet.attn_processors:
            parts = name.split(".")
            if parts[0] == "down_blocks":
                stage, level, rest = 0, int(parts[1]), parts[2:]
            elif parts[0] == "mid_block":
                stage, level, rest = 1, levels - 1, parts[1:]
            else:
                stage, level, rest = 2, levels - 1 - int(parts[1]), parts[2:]
            order = (stage, int(parts[1]) if stage != 1 else 0, *[int(p) for p in rest if p.isdigit()], rest[-2])
            layers.append({"name": name, "cross": rest[-2] == "attn2", "level": level, "size": sizes[level], "order": order})
        layers.sort(key=lambda layer: layer["order"])
        block = -1
        for layer in layers:
            block += not layer["cross"]
            layer["block"] = block
        return layers

    # -------------------------------------------------------------------------------------------------------------
    # Inversion

    def check_invert_inputs(self, image, source_prompt, num_inference_steps, guidance_scale, method, inner_steps):
        _check_choice("inversion_method", method, INVERSION_METHODS)
        prompts = _as_prompt_list(source_prompt, "source_prompt")
        images = _as_image_list(image)
        if len(prompts) != len(images):
            raise ValueError(
                f"source_prompt has {len(prompts)} prompt(s) for {len(images)} image(s); give one per image."
            )
        _check_steps(num_inference_steps)
        _check_guidance(guidance_scale, method)
        if not (isinstance(inner_steps, int) and inner_steps >= 0):
            raise ValueError(f"null_text_inner_steps must be an integer >= 0, got {inner_steps!r}.")
        return prompts

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
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                Images to invert; see `prepare_images` for formats and the resize policy.
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
        method = inversion_method or self.config.inversion_method
        inner_steps = self.config.null_text_inner_steps if null_text_inner_steps is None else null_text_inner_steps
        early_stop = self.config.null_text_early_stop if null_text_early_stop is None else null_text_early_stop
        init = null_text_init or self.config.null_text_init
        _check_choice("null_text_init", init, ("null", "prompt"))
        prompts = self.check_invert_inputs(image, source_prompt, num_inference_steps, guidance_scale, method, inner_steps)
        images = self.prepare_images(image, height, width, resize_mode)
        device = self._execution_device

        # 2. Encode prompts and images
        prompt_embeds = self.encode_text(prompts, device)
        latents = self.encode_images(images)

        # 3. DDIM inversion (w = 1, source prompt)
        timesteps, alphas, alphas_next = self.ddim_schedule(num_inference_steps, device)
        null_embeds = losses = None
        with self._controlled_unet(_Control()):
            trajectory = self.ddim_inversion(latents, prompt_embeds, timesteps, alphas, alphas_next)

            # 4. Null-text optimisation around the trajectory
            if method == "nti":
                start = self.encode_text([""], device).expand_as(prompt_embeds) if init == "null" else prompt_embeds
                null_embeds, losses = self.null_text_optimization(
                    trajectory, prompt_embeds, start, timesteps, alphas, alphas_next, guidance_scale, inner_steps,
                    early_stop,
                )

        self.maybe_free_model_hooks()
        return InversionResult(
            latents=trajectory.cpu(),
            prompt_embeds=prompt_embeds.cpu(),
            source_prompts=prompts,
            timesteps=timesteps.cpu(),
            method=method,
            guidance_scale=float(guidance_scale),
            image_size=tuple(images.shape[-2:]),
            null_embeds=None if null_embeds is None else null_embeds.cpu(),
            null_text_losses=None if losses is None else losses.cpu(),
            model_signature=self.model_signature(),
        )

    def ddim_inversion(self, latents, prompt_embeds, timesteps, alphas, alphas_next) -> torch.Tensor:
        """ALGORITHMS §1: run DDIM upwards with ε(z, t, E(src)) evaluated at the destination t. → (B, N+1, …)."""
        trajectory = [latents]
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i in reversed(range(len(timesteps))):
                noise = self.predict_noise(trajectory[-1], timesteps[i], prompt_embeds, alphas[i])
                trajectory.append(ddim_step(trajectory[-1], noise, alphas_next[i], alphas[i]))
                progress_bar.update()
        return torch.stack(trajectory, dim=1)

    def null_text_optimization(
        self, trajectory, prompt_embeds, start_embeds, timesteps, alphas, alphas_next, guidance_scale, inner_steps, early_stop
    ):
        """ALGORITHMS §2 (Mokady et al. 2023, Alg. 1): per step, optimise the unconditional embedding so that the
        guided DDIM step lands on the inversion trajectory.

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
                noise_cond = self.predict_noise(latents, t, prompt_embeds, alphas[i])
                null = null.detach().clone().requires_grad_(True)
                optimizer = torch.optim.Adam([null], lr=1e-2 * (1 - i / (2 * steps)))
                active = torch.ones(batch, dtype=torch.bool, device=latents.device)
                for j in range(inner_steps):
                    with torch.enable_grad():
                        noise_uncond = self.predict_noise(latents, t, null.to(self.unet.dtype), alphas[i])
                        noise = classifier_free_guidance(noise_uncond, noise_cond - noise_uncond, guidance_scale)
                        loss = (ddim_step(latents, noise, alphas[i], alphas_next[i]) - target).pow(2).flatten(1).mean(1)
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
                noise_uncond = self.predict_noise(latents, t, null.to(self.unet.dtype), alphas[i])
                noise = classifier_free_guidance(noise_uncond, noise_cond - noise_uncond, guidance_scale)
                latents = ddim_step(latents, noise, alphas[i], alphas_next[i])
        return torch.stack(nulls, dim=1), losses

    # -------------------------------------------------------------------------------------------------------------
    # Editing

    def check_inputs(
        self,
        inversion,
        num_inference_steps,
        guidance_scale,
        attention_control,
        proximal_guidance,
        proximal_quantile,
        proximal_threshold,
        mask_dilation,
        blend_threshold,
        blend_start,
        masactrl_start_step,
        masactrl_start_layer,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        self.check_inversion(inversion, num_inference_steps)
        _check_guidance(guidance_scale, inversion.method)
        _check_choice("attention_control", attention_control, ATTENTION_CONTROLS, allow_none=True)
        _check_choice("proximal_guidance", proximal_guidance, PROXIMAL_MODES, allow_none=True)
        if proximal_threshold is not None and not (isinstance(proximal_threshold, (int, float)) and proximal_threshold >= 0):
            raise ValueError(f"proximal_threshold must be a number >= 0, got {proximal_threshold!r}.")
        if not (isinstance(proximal_quantile, (int, float)) and 0 <= proximal_quantile <= 1):
            raise ValueError(f"proximal_quantile must lie in [0, 1], got {proximal_quantile!r}.")
        if not (isinstance(mask_dilation, int) and mask_dilation >= 0):
            raise ValueError(f"mask_dilation must be an integer >= 0, got {mask_dilation!r}.")
        if not 0 <= blend_threshold <= 1:
            raise ValueError(f"blend_threshold must lie in [0, 1], got {blend_threshold!r}.")
        if not 0 <= blend_start <= 1:
            raise ValueError(f"blend_start must lie in [0, 1], got {blend_start!r}.")
        if attention_control == "masactrl":
            steps = inversion.num_inference_steps
            if not (isinstance(masactrl_start_step, int) and 0 <= masactrl_start_step <= steps):
                raise ValueError(f"masactrl_start_step must be an integer in [0, {steps}], got {masactrl_start_step!r}.")
            blocks = sum(1 for name in self.unet.attn_processors if name.endswith("attn1.processor"))
            if masactrl_start_layer is not None and not (
                isinstance(masactrl_start_layer, int) and 0 <= masactrl_start_layer < blocks
            ):
                raise ValueError(
                    f"masactrl_start_layer must be an integer in [0, {blocks - 1}] (this UNet has {blocks} transformer"
                    f" blocks), got {masactrl_start_layer!r}."
                )
        _check_choice("output_type", output_type, ("pil", "np", "pt", "latent"))
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {sorted(unknown)}.")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | list[list[str]] | None = None,
        inversion: InversionResult | None = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int | None = None,
        attention_control: str | None = None,
        edit_type: str | None = None,
        cross_replace_steps: float | tuple[float, float] | dict | None = None,
        self_replace_steps: float | tuple[float, float] | None = None,
        reweight: dict[str, float] | list[dict[str, float]] | None = None,
        blend_words: tuple | list | None = None,
        blend_threshold: float = 0.3,
        blend_start: float = 0.2,
        masactrl_start_step: int = 4,
        masactrl_start_layer: int | None = None,
        proximal_guidance: str | bool | None = None,
        proximal_quantile: float = 0.7,
        proximal_threshold: float | None = None,
        inversion_guidance: bool = True,
        reconstruction_guidance: bool = False,
        guidance_step_size: float = 1.0,
        guidance_below_timestep: int = 400,
        mask_dilation: int = 1,
        return_edit_mask: bool = False,
        return_attention_maps: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""Regenerate inverted images: reconstruct them, or edit them toward target prompts.

        Args:
            prompt (`str`, `list[str]`, `list[list[str]]`, *optional*):
                Target prompt(s). `None` (or the source prompt) reconstructs. With one inverted image a list gives
                several targets, all edited in one batch; with a batch of inverted images give one prompt per image
                (or a list of targets per image). Each output equals editing that target alone.
            inversion (`InversionResult`): From `invert` or `load_inversion`.
            guidance_scale (`float`, defaults to 7.5): Classifier-free guidance scale w. The unconditional
                embedding is E(source) for NPI, U[i] for NTI and E("") for DDIM.
            num_inference_steps (`int`, *optional*): Must equal the inversion's step count if given.
            attention_control (`str`, *optional*): ``"p2p"`` (prompt-to-prompt) or ``"masactrl"`` (mutual
                self-attention). Defaults to ``"p2p"`` when any prompt-to-prompt argument is given, else none.
            edit_type (`str`, *optional*): ``"replace"`` (word swap, equal word counts) or ``"refine"`` (added or
                removed words); `None` picks per target.
            cross_replace_steps (`float`, `tuple` or `dict`, defaults to 0.4): Cross-attention replacement window
                as a fraction of the steps, a ``(start, end)`` pair, or ``{"default_": f, "word": (a, b)}``.
            self_replace_steps (`float` or `tuple`, defaults to 0.6): Self-attention replacement window.
            reweight (`dict` or `list[dict]`, *optional*): ``{"word": factor}`` scaling target words' attention
                (one dict for every target, or one per target).
            blend_words (`tuple` or `list`, *optional*): Local blend words. One image: ``(source_words,
                target_words)`` (target words apply to every target) or ``[source_words, target_1_words, …]``;
                several images: one ``(source_words, target_words)`` pair per image. Words: a string or a list.
            blend_threshold (`float`, defaults to 0.3), blend_start (`float`, defaults to 0.2): Local blend mask
                threshold and the fraction of steps after which blending starts.
            masactrl_start_step (`int`, defaults to 4): First step of mutual self-attention.
            masactrl_start_layer (`int`, *optional*): First controlled transformer block in call order (SD 1.x's
                reference value is 10 of 16). Default: the decoder blocks at ≥ ½ of the latent resolution, which is
                that same set on SD 1.x and stays meaningful at other resolutions and depths.
            proximal_guidance (`str` or `bool`, *optional*): ``"soft"``/``"hard"`` thresholding of the guidance
                direction of edited samples, `False` for none; `None` uses the pipeline's flag.
            proximal_quantile (`float`, defaults to 0.7): λ = this quantile of |ε_c − ε_u|, per edited sample.
                The reference takes one quantile over the whole batch; with the NPI source sample in the batch
                (its direction is zero) its q acts like ``2q − 1`` here (``((k+1)q − 1)/k`` for k targets).
            proximal_threshold (`float`, *optional*): A fixed λ instead of the quantile.
            inversion_guidance (`bool`, defaults to True): After each step with t < ``guidance_below_timestep``,
                pull the unedited region of the latent toward the inversion trajectory (ProxEdit §3.3).
            reconstruction_guidance (`bool`, defaults to False): The same pull on the predicted x0 toward z_0
                (ProxEdit App. B).
            guidance_step_size (`float`, defaults to 1.0): Step size η of both guidances (1 pins the region).
            guidance_below_timestep (`int`, defaults to 400): Guidances apply while t < this.
            mask_dilation (`int`, defaults to 1): Edit-mask dilation radius r (max-pool of 2r+1).
            return_edit_mask (`bool`, defaults to False): Return proximal guidance's edit masks as images.
            return_attention_maps (`bool`, defaults to False): Return average cross-attention maps of each output.
            generator: Accepted for API compatibility; DDIM with η = 0 draws no noise.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to True): Return a `NegativePromptInversionPipelineOutput`, else a tuple.
            callback_on_step_end, callback_on_step_end_tensor_inputs: As in diffusers' pipelines. ``latents``
                holds every branch (per image: its source branch when attention control is on, then its targets);
                ``edit_mask`` is proximal guidance's mask M of the edited branches (`None` without it).

        Examples:

        Returns:
            `NegativePromptInversionPipelineOutput` or `tuple`.
        """
        # 1. Check inputs (everything that can fail does so here, before any model runs)
        p2p_arguments = any(
            value is not None for value in (edit_type, cross_replace_steps, self_replace_steps, reweight, blend_words)
        )
        if attention_control is None and p2p_arguments:
            attention_control = "p2p"
        if proximal_guidance is None:
            proximal_guidance = self.config.proximal_guidance
        proximal_guidance = proximal_guidance or None
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        inversion = _as_inversion_result(inversion)  # one class from here on, whichever copy of this file made it
        self.check_inputs(
            inversion, num_inference_steps, guidance_scale, attention_control, proximal_guidance, proximal_quantile,
            proximal_threshold, mask_dilation, blend_threshold, blend_start, masactrl_start_step,
            masactrl_start_layer, output_type, callback_on_step_end_tensor_inputs,
        )
        targets = _targets_per_image(prompt, inversion.source_prompts)
        if attention_control != "p2p" and p2p_arguments:
            raise ValueError("edit_type, *_replace_steps, reweight and blend_words need attention_control='p2p'.")
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        steps = inversion.num_inference_steps

        # 2. Lay out the branches (latents) and the UNet batch rows that serve them
        branches = self.plan_branches(inversion, targets, attention_control)
        num_rows = _lay_out_rows(branches, guidance_scale)
        latent_size = tuple(inversion.latents.shape[-2:])

        # 3. Prepare attention control (text-side mapping raises here, before any UNet work)
        control = self.prepare_attention_control(
            branches, steps, latent_size, attention_control, edit_type,
            0.4 if cross_replace_steps is None else cross_replace_steps,
            0.6 if self_replace_steps is None else self_replace_steps,
            reweight, blend_words, blend_threshold, blend_start, masactrl_start_step, masactrl_start_layer,
            return_attention_maps, device,
        )

        # 4. Embeddings of every row at every step
        row_embeds = self.row_embeddings(branches, num_rows, inversion, device)

        # 5. Controlled denoising from z_T
        timesteps, alphas, alphas_next = self.ddim_schedule(steps, device)
        guided_steps = [t < guidance_below_timestep for t in timesteps.tolist()]
        images_of = _index([branch.image for branch in branches], device)
        trajectory = inversion.latents.to(device)[images_of]  # (branches, N+1, …): anchors for the guidances
        latents = trajectory[:, steps].clone()
        row_branch, cond_rows, uncond_rows = _row_indices(branches, num_rows, device)
        edited = _index([k for k, branch in enumerate(branches) if not branch.is_source], device)
        edit_fraction = torch.zeros(len(edited), 1, *latent_size, device=device)
        self._num_timesteps = steps

        with self._controlled_unet(control) as control, self.progress_bar(total=steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                control.step.fill_(i)
                noise = self.predict_noise(latents[row_branch], t, row_embeds[i], alphas[i])
                noise_uncond, direction = noise[uncond_rows], noise[cond_rows] - noise[uncond_rows]
                edit_mask = None
                if proximal_guidance is not None:
                    prox_direction, threshold = proximal_direction(
                        direction[edited], proximal_guidance, proximal_quantile, proximal_threshold
                    )
                    edit_mask = edit_region(prox_direction, threshold, mask_dilation)
                    direction = direction.index_copy(0, edited, prox_direction)
                    edit_fraction += edit_mask.mean(dim=1, keepdim=True)
                noise = classifier_free_guidance(noise_uncond, direction, guidance_scale)

                x0 = predict_x0(latents, noise, alphas[i])
                if edit_mask is not None and reconstruction_guidance and guided_steps[i]:
                    pulled = guide_towards(x0[edited], trajectory[edited, 0], 1 - edit_mask, guidance_step_size)
                    x0 = x0.index_copy(0, edited, pulled)
                latents = renoise(x0, noise, alphas_next[i])
                if edit_mask is not None and inversion_guidance and guided_steps[i]:
                    anchor = trajectory[edited, steps - i - 1]
                    pulled = guide_towards(latents[edited], anchor, 1 - edit_mask, guidance_step_size)
                    latents = latents.index_copy(0, edited, pulled)
                if control.blend is not None and i >= control.blend["start"]:
                    latents = self.local_blend(latents, control)

                if callback_on_step_end is not None:
                    step_tensors = {"latents": latents, "edit_mask": edit_mask}
                    callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 6. Decode the edited branches
        latents = latents[edited]
        if output_type == "latent":
            images, has_nsfw = latents, None
        else:
            images = self.decode_latents(latents)
            images, has_nsfw = self.run_safety_checker(images, device, row_embeds.dtype)
            do_denormalize = [True] * len(images) if has_nsfw is None else [not flag for flag in has_nsfw]
            images = self.image_processor.postprocess(images, output_type=output_type, do_denormalize=do_denormalize)
        edit_masks = None
        if return_edit_mask and proximal_guidance is not None:
            edit_masks = _masks_to_images(edit_fraction / steps, inversion.image_size)
        attention_maps = None
        if return_attention_maps:
            maps = control.store.average()
            attention_maps = [maps[k].cpu() for k in edited.tolist()]

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, has_nsfw)
        return NegativePromptInversionPipelineOutput(
            images=images, nsfw_content_detected=has_nsfw, edit_masks=edit_masks, attention_maps=attention_maps
        )

    # -------------------------------------------------------------------------------------------------------------
    # Editing: building blocks

    def plan_branches(self, inversion: InversionResult, targets: list[list[str]], attention_control) -> list[_Branch]:
        """One branch per target, plus a source branch per image when attention control needs the source's
        attention. Unconditional embeddings follow ALGORITHMS §2–§6: E(src) for NPI (its "null" is E("")), U[i] for
        NTI, E("") for DDIM; MasaCtrl's synthesis branch uses the null embedding (ProxMasaCtrl)."""
        method = inversion.method
        base = {"npi": "source", "nti": "null_text", "ddim": "empty"}[method]
        null = {"npi": "empty", "nti": "null_text", "ddim": "empty"}[method]
        target_uncond = null if attention_control == "masactrl" else base
        controlled = attention_control is not None
        branches = []
        for image, (source, prompts) in enumerate(zip(inversion.source_prompts, targets)):
            if controlled:
                branches.append(_Branch(image, source, source, True, base, controlled=False))
            branches += [_Branch(image, source, prompt, False, target_uncond, controlled) for prompt in prompts]
        return branches

    def row_embeddings(self, branches: list[_Branch], num_rows: int, inversion: InversionResult, device):
        """``(steps, rows, tokens, dim)`` text embeddings; only NTI's rows change from step to step."""
        source = inversion.prompt_embeds.to(device=device, dtype=self.unet.dtype)
        needed = [b.prompt for b in branches if b.prompt != b.source_prompt]
        texts = self._encode_unique(needed + [""] * any(b.uncond == "empty" for b in branches), device)
        null_text = None if inversion.null_embeds is None else inversion.null_embeds.to(device=device, dtype=self.unet.dtype)

        def cond(branch):
            return source[branch.image] if branch.prompt == branch.source_prompt else texts[branch.prompt]

        def uncond(branch):
            if branch.uncond == "source":
                return source[branch.image]
            return texts[""] if branch.uncond == "empty" else null_text[branch.image]

        rows = [None] * num_rows
        for branch in branches:
            rows[branch.cond_row] = cond(branch)
            if branch.uncond_row != branch.cond_row:
                rows[branch.uncond_row] = uncond(branch)
        steps = inversion.num_inference_steps
        if all(row.dim() == 2 for row in rows):
            return torch.stack(rows)[None].expand(steps, -1, -1, -1)
        return torch.stack([row.expand(steps, -1, -1) if row.dim() == 2 else row for row in rows], dim=1)

    def token_edit(self, source: str, target: str, edit_type: str | None, weights: dict | None):
        """The prompt-to-prompt edit of one target: word swap for equal word counts, else refinement."""
        if edit_type is None:
            edit_type = "replace" if len(source.split(" ")) == len(target.split(" ")) else "refine"
        edit = (word_swap if edit_type == "replace" else refinement)(source, target, self.tokenizer)
        return reweighting(edit, target, weights, self.tokenizer) if weights else edit

    def _map_level(self, layers: list[dict]) -> tuple[int, tuple[int, int]]:
        """Cross-attention map size read by local blend and visualisation: ¼ of the latent (16×16 at 512 px, as
        the references), but not coarser than 8 tokens on the short side when the latent is small."""
        sizes = {layer["level"]: layer["size"] for layer in layers if layer["cross"]}
        wanted = max([level for level, size in sizes.items() if min(size) >= 8 and level <= 2], default=min(sizes))
        height, width = sizes[wanted]
        return height * width, (height, width)

    def prepare_attention_control(
        self, branches, steps, latent_size, attention_control, edit_type, cross_replace_steps,
        self_replace_steps, reweight, blend_words, blend_threshold, blend_start, masactrl_start_step,
        masactrl_start_layer, return_attention_maps, device,
    ) -> _Control:
        """Build the processors (by layer name) for this call. All text-side validation happens here."""
        step = torch.zeros((), dtype=torch.long, device=device)
        if attention_control is None and not return_attention_maps:
            return _Control(step=step)
        _check_choice("edit_type", edit_type, EDIT_TYPES, allow_none=True)
        layers = self.attention_layers(latent_size)
        source_of = {branch.image: k for k, branch in enumerate(branches) if branch.is_source}
        targets = [k for k, branch in enumerate(branches) if not branch.is_source]
        sources = [source_of.get(branches[k].image, k) for k in targets]
        cond_rows = _index([branch.cond_row for branch in branches], device)
        control = _Control(step=step)
        if return_attention_maps or blend_words is not None:
            length, size = self._map_level(layers)
            control.store = AttentionStore(length, size, len(branches), self.tokenizer.model_max_length, device)

        if attention_control == "p2p":
            prompts = [branches[k].prompt for k in targets]
            weights = _per_target(reweight, len(targets), "reweight")
            edits = [
                self.token_edit(branches[k].source_prompt, branches[k].prompt, edit_type, w)
                for k, w in zip(targets, weights)
            ]
            alpha = cross_attention_window(steps, prompts, cross_replace_steps, self.tokenizer).to(device)
            window = self_attention_window(steps, self_replace_steps).to(device)
            source_pos, target_pos = _index(sources, device), _index(targets, device)
            cross = ControlledAttnProcessor(
                CrossAttentionControl(step, cond_rows, source_pos, target_pos, stack_edits(edits).to(device), alpha, control.store)
            )
            self_replace = ControlledAttnProcessor(
                SelfAttentionReplace(step, window, cond_rows[source_pos], cond_rows[target_pos])
            )
            for layer in layers:
                # Self-attention replacement skips the full-resolution layers (the references' "≤ 32²" at 512 px).
                if layer["cross"] or layer["level"] >= 1:
                    control.processors[layer["name"]] = cross if layer["cross"] else self_replace
        elif control.store is not None:
            empty = _index([], device)
            recorder = ControlledAttnProcessor(CrossAttentionControl(step, cond_rows, empty, empty, store=control.store))
            control.processors.update({layer["name"]: recorder for layer in layers if layer["cross"]})

        if attention_control == "masactrl":
            pairs = [(branches[s].cond_row, branches[t].cond_row) for s, t in zip(sources, targets)]
            pairs += [
                (branches[s].uncond_row, branches[t].uncond_row)
                for s, t in zip(sources, targets)
                if branches[t].uncond_row != branches[t].cond_row
            ]
            start = torch.tensor(masactrl_start_step, device=device)  # a tensor: changing it reuses captured graphs
            rule = MutualSelfAttention(
                step, start, _index([s for s, _ in pairs], device), _index([t for _, t in pairs], device)
            )
            levels = len(self.unet.config.down_block_types)
            for layer in layers:
                decoder_fine = layer["order"][0] == 2 and layer["level"] <= min(1, levels - 1)
                chosen = decoder_fine if masactrl_start_layer is None else layer["block"] >= masactrl_start_layer
                if not layer["cross"] and chosen:
                    control.processors[layer["name"]] = ControlledAttnProcessor(rule)

        if blend_words is not None:
            control.blend = {
                "weights": self._blend_weights(branches, blend_words, len(source_of)).to(device),
                "targets": _index(targets, device),
                "sources": _index(sources, device),
                "threshold": blend_threshold,
                "start": int(blend_start * steps),
            }
        return control

    def _blend_weights(self, branches: list[_Branch], blend_words, num_images: int) -> torch.Tensor:
        """``(branches, tokens)``: 1 on each branch's blend-word tokens."""
        words_of = _blend_words_per_branch(branches, blend_words, num_images)
        weights = torch.zeros(len(branches), self.tokenizer.model_max_length)
        for k, (branch, words) in enumerate(zip(branches, words_of)):
            for word in words:
                positions = find_word(branch.prompt, word, self.tokenizer)
                if not positions:
                    role = "source" if branch.is_source else "target"
                    raise ValueError(f"blend word {word!r} is not in the {role} prompt {branch.prompt!r}.")
                weights[k, positions] = 1.0
        return weights

    def local_blend(self, latents: torch.Tensor, control: _Control) -> torch.Tensor:
        """P2P local blend: outside the blend words' attention, each target keeps its source's latent."""
        blend = control.blend
        maps = control.store.average()
        mask = local_blend_mask(maps, blend["weights"], tuple(latents.shape[-2:]), blend["threshold"])
        targets, sources = blend["targets"], blend["sources"]
        mask = (mask[targets] | mask[sources]).to(latents.dtype)
        blended = latents[sources] + mask * (latents[targets] - latents[sources])
        return latents.index_copy(0, targets, blended)

    def attention_heat_maps(self, maps: torch.Tensor, prompt: str, image: PIL.Image.Image | None = None):
        """A PIL grid of one prompt's cross-attention maps (``output.attention_maps[k]``), one tile per token."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
        labels = [self.tokenizer.decode([token]) for token in ids]
        return heat_map_grid(maps[..., : len(ids)], labels, image)

    def run_safety_checker(self, image, device, dtype):
        if self.safety_checker is None:
            return image, None
        features = self.feature_extractor(self.image_processor.postprocess(image, output_type="pil"), return_tensors="pt")
        return self.safety_checker(images=image, clip_input=features.pixel_values.to(device=device, dtype=dtype))


# =================================================================================================================
# Input helpers


# Config entries that record how a model was saved or loaded, not what its weights compute: `save_pretrained` adds
# `architectures` and `dtype`, a load in another dtype changes `dtype`, each library stamps its version, and runtime
# output switches can be set per load. Keys starting with "_" (`_name_or_path`, `_diffusers_version`,
# `_use_default_values`, ...) are bookkeeping of the same kind.
_INCIDENTAL_CONFIG_KEYS = frozenset(
    {"architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "output_hidden_states",
     "output_attentions", "return_dict"}
)

# A weight loaded in bfloat16 (or float16) is its float32 value rounded to 8 (11) significant bits: at most eps/2 of
# bfloat16 apart, relative. Probes match within eps relative to the probe's largest weight: every such cast passes
# (also values near zero, where float16 loses relative precision); weights that differ by more are another model.
_PROBE_TOLERANCE = torch.finfo(torch.bfloat16).eps


def _architecture_config(config) -> dict:
    return {key: value for key, value in config.items() if not (key.startswith("_") or key in _INCIDENTAL_CONFIG_KEYS)}


def _same_weights(mine: list[float], theirs) -> bool:
    if not (isinstance(theirs, list) and len(theirs) == len(mine) and all(_is_number(value) for value in theirs)):
        return False
    tolerance = _PROBE_TOLERANCE * max(abs(value) for value in mine)
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


def _check_choice(name: str, value, choices, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}{' or None' if allow_none else ''}, got {value!r}.")


def _check_steps(num_inference_steps) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")


def _check_guidance(guidance_scale, method: str) -> None:
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
    if method == "nti" and guidance_scale < 1:
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


def _blend_words_per_branch(branches: list[_Branch], blend_words, num_images: int) -> list[list[str]]:
    """Spread ``blend_words`` over the branches.

    One image: ``(source_words, target_words)`` (target words for every target) or ``[source_words,
    target_1_words, …]``. Several images: a list with one ``(source_words, target_words)`` pair per image.
    Words are a string or a list of strings.
    """
    as_list = lambda words: [words] if isinstance(words, str) else list(words)  # noqa: E731
    usage = (
        "blend_words must be (source_words, target_words) or [source_words, target_1_words, …] for one image, or"
        f" one (source_words, target_words) pair per image for several; got {blend_words!r}."
    )
    if not isinstance(blend_words, (tuple, list)):
        raise ValueError(usage)
    targets_per_image = [sum(1 for b in branches if b.image == i and not b.is_source) for i in range(num_images)]
    if num_images == 1 and len(blend_words) in (2, 1 + targets_per_image[0]):
        per_image = [[as_list(blend_words[0])] + [as_list(w) for w in blend_words[1:]]]
        if len(blend_words) == 2:
            per_image = [[per_image[0][0]] + per_image[0][1:] * targets_per_image[0]]
    elif num_images > 1 and len(blend_words) == num_images and all(
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


def _per_target(value, count: int, name: str) -> list:
    if value is None or isinstance(value, dict):
        return [value] * count
    if isinstance(value, (list, tuple)) and len(value) == count and all(isinstance(v, dict) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a dict or a list of {count} dicts (one per target), got {value!r}.")


def _as_image_list(image) -> list:
    if isinstance(image, PIL.Image.Image):
        return [image]
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return list(image)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3):
        return [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, (PIL.Image.Image, np.ndarray, torch.Tensor)) for i in image):
        return list(image)
    raise TypeError(
        "image must be a PIL image, a numpy array (HWC or NHWC), a torch tensor (CHW or NCHW), or a non-empty list"
        f" of them; got {type(image).__name__}."
    )


def _image_to_tensor(image) -> torch.Tensor:
    """One image → ``(1, 3, H, W)`` float32 in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        image = torch.from_numpy(np.ascontiguousarray(image)).float() / scale
        image = image[..., None] if image.ndim == 2 else image
        image = image.permute(2, 0, 1)
    image = image.float()
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"image must have 1, 3 or 4 channels (CHW tensors, HWC arrays), got shape {tuple(image.shape)}.")
    if image.min() < 0 or image.max() > 1:
        raise ValueError("image values must lie in [0, 1] (uint8 arrays are divided by 255).")
    return image[:3].expand(3, -1, -1)[None].contiguous()


def _resize(image: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image
    if mode == "crop":
        scale = max(height / image.shape[-2], width / image.shape[-1])
        size = (max(height, round(image.shape[-2] * scale)), max(width, round(image.shape[-1] * scale)))
    else:
        size = (height, width)
    image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return image[..., top : top + height, left : left + width]


def _index(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)


def _masks_to_images(fraction: torch.Tensor, image_size: tuple[int, int]) -> list[PIL.Image.Image]:
    """Edit-mask fractions ``(n, 1, h, w)`` → grey PIL images at the image size (white = edited)."""
    upsampled = F.interpolate(fraction.float().cpu(), size=image_size, mode="nearest")
    return [PIL.Image.fromarray((m[0].clamp(0, 1) * 255).round().byte().numpy(), mode="L") for m in upsampled]
