"""PIE-Bench manifests and metrics: read a PIE-Bench folder (or a JSONL / CSV manifest), decode its masks, and score
edits as PnPInversion's ``evaluation/`` does.

PIE-Bench (Ju et al. 2024, "PnP Inversion"; cure-lab/PnPInversion) is a folder::

    annotation_images/<type>_<name>/<id>.jpg   the source images (512 x 512)
    mapping_file.json                          {id: entry}, id a 12-digit string

with one entry per edit::

    image_path           relative to annotation_images/
    original_prompt      the source caption; "[...]" marks the words the edit changes
    editing_prompt       the target caption, "[...]" marking the new words (brackets are stripped before use)
    editing_instruction  the edit as an instruction
    editing_type_id      "0".."9" (EDITING_TYPES)
    blended_word         "source_word target_word" (prompt-to-prompt's local-blend words)
    mask                 the edited region, run-length encoded: flat list [start, length, start, length, ...]
                         over the row-major flattened H x W image, 1 = edited

Mask convention, as PnPInversion's ``mask_decode``: a run's length is clipped at the end of the image, and the
decoder then sets the 1-px image border to 1 (edited), "to avoid annotation errors in boundary". So the border never
counts as background in the reference metrics; ``decode_mask(..., border=False)`` gives the annotation as written.

Background ("unedited part") PSNR / MSE / SSIM follow the reference exactly: both images are quantised to 8 bits
(the reference reads them from image files), multiplied by (1 - mask), and the metric is taken over the **whole**
product images. The masked pixels are zero in both, so they add no error but do count in the mean: the reference's
background PSNR is higher than a PSNR over background pixels alone by 10·log10(1 / background fraction).

Learned metrics need weights, which this module never downloads. Each is computed only when its weights are already
on this machine, and otherwise skipped with a message saying what is missing:

* structure distance: MSE between the self-similarity (cosine) of the last-layer keys of DINO ViT-B/8 for source and
  edit, images resized to 224 on the short side (at most 480) and ImageNet-normalised; needs the torch hub checkout
  ``facebookresearch_dino_main`` and its checkpoint in ``torch.hub.get_dir()``;
* CLIP score (ViT-L/14) of the edit against the target prompt, whole image and image × mask: 100 · max(cos, 0);
  needs ``openai/clip-vit-large-patch14`` in the Hugging Face cache;
* LPIPS (SqueezeNet) on the background product images: needs torchmetrics and torchvision's SqueezeNet 1.1
  checkpoint in ``torch.hub.get_dir()/checkpoints``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# PIE-Bench's editing_type_id values (the folder-name prefixes of annotation_images/).
EDITING_TYPES = {
    "0": "random", "1": "change_object", "2": "add_object", "3": "delete_object", "4": "change_attribute_content",
    "5": "change_attribute_pose", "6": "change_attribute_color", "7": "change_attribute_material",
    "8": "change_background", "9": "change_style",
}


# --------------------------------------------------------------------------------------------------- masks


def encode_mask(mask) -> list[int]:
    """Run-length code of a boolean [H, W] mask: [start, length, ...] over the row-major flattening."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # run starts and ends alternate
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).reshape(-1).astype(int).tolist()


def decode_mask(encoded, shape=(512, 512), border: bool = True) -> np.ndarray:
    """Boolean [H, W] mask from PIE-Bench's run-length code (1 = edited). ``border=True`` reproduces PnPInversion's
    decoder, which marks the 1-px image border as edited."""
    height, width = shape
    flat = np.zeros(height * width, dtype=bool)
    runs = np.asarray(encoded, dtype=np.int64).reshape(-1, 2)
    for start, length in runs:
        flat[start : min(start + length, flat.size)] = True  # runs past the end are clipped
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


# ---------------------------------------------------------------------------------------------- prompts


def strip_brackets(prompt: str) -> str:
    return prompt.replace("[", "").replace("]", "")


def bracketed(prompt: str) -> list[str]:
    """The [...] phrases of a PIE-Bench prompt, in order."""
    return re.findall(r"\[([^\]]*)\]", prompt)


# -------------------------------------------------------------------------------------------- manifests


@dataclass
class Item:
    """One manifest row: an image, its source prompt, its target prompt(s), optional blend words and mask."""

    id: str
    image: Path
    source_prompt: str
    target_prompts: list[str]
    blend: tuple[str, str] | None = None
    mask: list[int] | Path | None = None  # PIE-Bench run-length code, or a mask image file
    problem: str | None = None  # a row that could not be parsed: recorded as an error, never raised
    editing_type: str | None = None  # PIE-Bench's editing_type_id
    entry: dict = field(default_factory=dict)  # the raw row


def read_manifest(path, images: str | None = None) -> list[Item]:
    """Items of a PIE-Bench ``mapping_file.json`` (images under ``annotation_images/`` beside it) or of a JSONL / CSV
    file (columns ``image, source_prompt, target_prompt`` or JSONL ``target_prompts`` (a list), optional ``id``,
    ``blend`` ("source_word target_word") and ``mask`` (an image file, white = edited)). Relative image and mask
    paths resolve against ``images`` (default: the manifest's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MANIFEST: no file {path}")
    if path.suffix == ".json":
        root = Path(images) if images else path.parent / "annotation_images"
        return [_pie_item(key, entry, root) for key, entry in json.loads(path.read_text()).items()]
    root = Path(images) if images else path.parent
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise ValueError(f"MANIFEST: {path} is not a mapping_file.json, .jsonl or .csv file")
    return [_row_item(index, row, root) for index, row in enumerate(rows)]


def _pie_item(key: str, entry: dict, root: Path) -> Item:
    words = (entry.get("blended_word") or "").split()
    try:
        return Item(
            id=key, image=root / entry["image_path"], source_prompt=strip_brackets(entry["original_prompt"]),
            target_prompts=[strip_brackets(entry["editing_prompt"])],
            blend=tuple(words) if len(words) == 2 else None, mask=entry.get("mask"),
            editing_type=entry.get("editing_type_id"), entry=entry,
        )
    except (KeyError, TypeError) as error:
        return Item(key, root, "", [], problem=f"mapping entry {key}: missing or bad field {error}")


def _row_item(index: int, row: dict, root: Path) -> Item:
    item_id = str(row.get("id") or f"{index:06d}")
    try:
        targets = row.get("target_prompts") or [row["target_prompt"]]
        blend = row.get("blend") or None
        blend = tuple(blend.split() if isinstance(blend, str) else blend) if blend else None
        if blend is not None and len(blend) != 2:
            raise ValueError(f"blend must be 'source_word target_word', got {row.get('blend')!r}")
        return Item(item_id, root / row["image"], row["source_prompt"], list(targets), blend,
                    root / row["mask"] if row.get("mask") else None, entry=row)
    except (KeyError, TypeError, ValueError) as error:
        message = f"missing column {error}" if isinstance(error, KeyError) else str(error)
        return Item(item_id, root, "", [], problem=f"manifest row {index}: {message}")


def load_image(path) -> torch.Tensor:
    """An image file as [3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def load_mask(item: Item, size: tuple[int, int]) -> torch.Tensor:
    """The edited region, bool [H, W] (PIE-Bench's decoder: the 1-px border counts as edited); all False without a
    mask."""
    if item.mask is None:
        return torch.zeros(size, dtype=torch.bool)
    if isinstance(item.mask, Path):
        if not item.mask.is_file():
            raise FileNotFoundError(f"no mask file {item.mask}")
        mask = np.array(Image.open(item.mask).convert("L")) > 127
        if mask.shape != size:
            raise ValueError(f"mask {item.mask} is {mask.shape[1]}x{mask.shape[0]}, the image {size[1]}x{size[0]}")
        return torch.from_numpy(mask)
    starts = np.asarray(item.mask, dtype=np.int64).reshape(-1, 2)[:, 0]
    if len(starts) and starts.max() >= size[0] * size[1]:
        raise ValueError(f"mask runs start past the end of the {size[1]}x{size[0]} image")
    return torch.from_numpy(decode_mask(item.mask, size))


# ---------------------------------------------------------------------------------------------- metrics


def quantise(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] as an 8-bit image file stores it."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round() / 255


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1]; over ``mask`` pixels only when given."""
    error = (a.float() - b.float()) ** 2
    if mask is not None:
        mask = mask.expand_as(error)
        if not mask.any():
            return float("nan")
        error = error[mask]
    return float(10 * torch.log10(1 / error.mean().clamp_min(1e-10)))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004) with an 11×11 Gaussian window (σ 1.5), averaged over channels."""
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)
    a, b = a.float()[None], b.float()[None]
    blur = lambda x: F.conv2d(x, window, groups=3)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def background_metrics(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> dict:
    """PSNR (dB), MSE and SSIM of ``source`` × (1 − mask) against ``edited`` × (1 − mask), whole image, as the
    reference. ``mask`` bool [H, W], True = edited. NaN when nothing is background (the reference's "nan")."""
    keep = (~mask.bool()).float()[None]
    if keep.sum() == 0:
        return {"psnr": float("nan"), "mse": float("nan"), "ssim": float("nan")}
    a, b = quantise(source) * keep, quantise(edited) * keep
    mse = float((a - b).pow(2).mean())
    return {"psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"), "mse": mse, "ssim": ssim(a, b)}


class LearnedMetrics:
    """The reference's learned metrics whose weights are already on this machine; ``skipped`` says why the others
    are not computed."""

    def __init__(self, device="cpu"):
        self.device, self.skipped, self.available = torch.device(device), {}, {}
        for name, loader in (("structure_distance", self._dino), ("clip", self._clip), ("lpips", self._lpips)):
            try:
                self.available[name] = loader()
            except Exception as error:  # any failure to load locally means: skip, never download
                self.skipped[name] = f"{name} skipped: {error}"

    def _dino(self):
        hub = Path(torch.hub.get_dir())
        repo = hub / "facebookresearch_dino_main"
        weights = hub / "checkpoints" / "dino_vitbase8_pretrain.pth"
        if not repo.is_dir() or not weights.is_file():
            raise FileNotFoundError(f"no DINO ViT-B/8 at {repo} + {weights}")
        return torch.hub.load(str(repo), "dino_vitb8", source="local").to(self.device).eval()

    def _clip(self):
        from transformers import CLIPModel, CLIPProcessor

        name = "openai/clip-vit-large-patch14"
        try:
            model = CLIPModel.from_pretrained(name, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
        except OSError as error:
            raise FileNotFoundError(f"{name} is not in the local Hugging Face cache") from error
        return model.to(self.device).eval(), processor

    def _lpips(self):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"no SqueezeNet 1.1 checkpoint at {checkpoint}")
        return LearnedPerceptualImagePatchSimilarity(net_type="squeeze").to(self.device)

    @torch.no_grad()
    def __call__(self, source, edited, mask, target_prompt) -> dict:
        out = {}
        src, edt = quantise(source).to(self.device), quantise(edited).to(self.device)
        if "structure_distance" in self.available:
            out["structure_distance"] = float(F.mse_loss(self._key_similarity(edt), self._key_similarity(src)))
        if "clip" in self.available:
            out["clip_whole"] = self._clip_score(edt, target_prompt)
            out["clip_edited"] = self._clip_score(edt * mask.to(self.device).float()[None], target_prompt)
        if "lpips" in self.available:
            keep = (~mask.bool()).to(self.device).float()[None]
            out["lpips"] = float(self.available["lpips"]((src * keep)[None] * 2 - 1, (edt * keep)[None] * 2 - 1))
        return out

    def _key_similarity(self, image):
        model = self.available["structure_distance"]
        h, w = image.shape[-2:]
        short = 224 if max(h, w) * 224 / min(h, w) <= 480 else int(480 * min(h, w) / max(h, w))
        size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        x = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
        captured = {}
        hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
        try:
            model((x - mean) / std)
        finally:
            hook.remove()
        qkv = captured["qkv"][0]  # [tokens, 3 * dim]
        dim = qkv.shape[1] // 3
        keys = F.normalize(qkv[:, dim : 2 * dim], dim=-1)  # heads concatenated, as the reference's reshape
        return keys @ keys.T

    def _clip_score(self, image, prompt) -> float:
        model, processor = self.available["clip"]
        pixels = (image * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        inputs = processor(text=[prompt], images=[pixels], return_tensors="pt", padding=True).to(self.device)
        img = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=inputs["input_ids"],
                                                  attention_mask=inputs["attention_mask"]), dim=-1)
        return float(100 * (img * txt).sum().clamp(min=0))
