"""PIE-Bench's editing metrics (as PnPInversion's ``evaluation/``), plus the toy world's exact ones.

Background ("unedited part") PSNR / MSE / SSIM follow the reference exactly: both images are quantised to
8 bits (the reference reads them from image files), multiplied by (1 - mask), and the metric is taken over the
**whole** product images. The masked pixels are zero in both, so they add no error but do count in the mean:
the reference's background PSNR is higher than a PSNR over background pixels alone by 10·log10(1 / background
fraction). ``toy_world.evaluate.psnr(a, b, mask)`` is the background-only kind; both are reported.

Learned metrics need weights, which are never downloaded here. Each is computed only when its weights are
already on this machine, and otherwise skipped with a message saying what is missing:

* structure distance: MSE between the self-similarity (cosine) of the last-layer keys of DINO ViT-B/8 for
  source and edit, images resized to 224 on the short side (at most 480) and ImageNet-normalised; needs the
  torch hub checkout ``facebookresearch_dino_main`` and its checkpoint in ``torch.hub.get_dir()``;
* CLIP score (ViT-L/14) of the edit against the target prompt, whole image and image × mask: 100 · max(cos, 0);
  needs ``openai/clip-vit-large-patch14`` in the Hugging Face cache;
* LPIPS (SqueezeNet) on the background product images: needs torchmetrics and torchvision's SqueezeNet 1.1
  checkpoint in ``torch.hub.get_dir()/checkpoints``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from . import evaluate


def quantise(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] as an 8-bit image file stores it."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round() / 255


def background_metrics(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> dict:
    """PSNR (dB), MSE and SSIM of ``source`` × (1 − mask) against ``edited`` × (1 − mask), whole image, as the
    reference. ``mask`` bool [H, W], True = edited. NaN when nothing is background (the reference's "nan")."""
    keep = (~mask.bool()).float()[None]
    if keep.sum() == 0:
        return {"psnr": float("nan"), "mse": float("nan"), "ssim": float("nan")}
    a, b = quantise(source) * keep, quantise(edited) * keep
    mse = float((a - b).pow(2).mean())
    return {"psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"), "mse": mse,
            "ssim": evaluate.ssim(a, b)}


def toy_metrics(edited: torch.Tensor, truth: dict) -> dict:
    """Exact metrics against the toy world's ground truth: edit PSNR against the true edited image,
    unedited PSNR over background pixels only (exact mask), attribute accuracy and objects kept (the judge)."""
    edit = truth["edit"]
    image = quantise(edited)
    return {
        "edit_psnr": evaluate.psnr(image, truth["target_image"]),
        "unedited_psnr_exact": evaluate.psnr(image, edit.source_image, ~edit.mask[None]),
        "attribute_ok": evaluate.attribute_ok(image, edit),
        "objects_kept": evaluate.objects_kept(image, edit),
    }


# ----------------------------------------------------------------------------------- learned, if present


class LearnedMetrics:
    """The reference's learned metrics whose weights are already on this machine; ``skipped`` says why the
    others are not computed."""

    def __init__(self, device="cpu"):
        self.device, self.skipped, self.available = torch.device(device), {}, {}
        for name, loader in (("structure_distance", self._dino), ("clip", self._clip), ("lpips", self._lpips)):
            try:
                self.available[name] = loader()
            except Exception as error:  # any failure to load locally means: skip, never download
                self.skipped[name] = f"{name} skipped: {error}"

    # loaders ------------------------------------------------------------------------------------------------
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

    # metrics ------------------------------------------------------------------------------------------------
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
        qkv = captured["qkv"][0]                      # [tokens, 3 * dim]
        dim = qkv.shape[1] // 3
        keys = qkv[:, dim : 2 * dim]                  # heads concatenated, as the reference's reshape
        keys = F.normalize(keys, dim=-1)
        return keys @ keys.T

    def _clip_score(self, image, prompt) -> float:
        model, processor = self.available["clip"]
        pixels = (image * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        inputs = processor(text=[prompt], images=[pixels], return_tensors="pt", padding=True).to(self.device)
        img = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = F.normalize(model.get_text_features(input_ids=inputs["input_ids"],
                                                  attention_mask=inputs["attention_mask"]), dim=-1)
        return float(100 * (img * txt).sum().clamp(min=0))
