"""Editing evaluation on the toy world, where every edit has an exact ground truth.

For each (scene, edit) pair and each method it measures:

- reconstruction PSNR of the inversion (regenerating the input without edit),
- edit PSNR / SSIM against the ground-truth edited image,
- unedited-region PSNR against the input (pixels outside the edit region must not change),
- attribute accuracy: the judge's verdict on the edited object (or background) of the target scene,
- seconds per image (inversion + edit, wall clock, batch-amortised).

Used by ``benchmarks/toy_edit_benchmark.py`` (the 200-pair benchmark), ``toy_world.demo`` (the README's main
command) and the CPU tests (a small subset).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from negative_prompt_inversion.pie_bench import psnr, ssim

from . import judge as judge_module
from . import scenes


# Toy world v2 (128 px, SD's UNet layout): the embedded default, and its image size.
MODEL_DIR, MODEL_RES = Path(__file__).resolve().parent / "model_v2", scenes.RES_V2

P2P = {"cross_replace_steps": 0.4, "self_replace_steps": 0.6}
# name → (inversion method, call arguments, prompt-to-prompt settings (with local blend of the edit's words) or None)
METHODS = {
    "ddim+cfg": ("ddim", {}, None),
    "nti": ("nti", {}, None),
    "nti+p2p": ("nti", {}, P2P),
    "npi": ("npi", {}, None),
    "npi+p2p": ("npi", {}, P2P),
    "proxnpi": ("npi", {"proximal_guidance": "soft"}, None),
    "proxnpi+p2p": ("npi", {"proximal_guidance": "soft"}, P2P),
    "masactrl": ("npi", {"attention_control": "masactrl"}, None),
    "proxmasactrl": ("npi", {"attention_control": "masactrl", "proximal_guidance": "soft"}, None),
    "di+p2p": ("direct", {}, P2P),
    "di+masactrl": ("direct", {"attention_control": "masactrl"}, None),
}


def load_pipeline(model_dir=MODEL_DIR, device="cpu", dtype=torch.float32):
    """The product's pipeline over the toy model, every component in ``dtype`` (the weights are stored in float16)."""
    from negative_prompt_inversion import NegativePromptInversionPipeline

    pipe = NegativePromptInversionPipeline.from_pretrained(str(model_dir), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_pairs(count: int, seed: int = 0, res: int = MODEL_RES) -> list[scenes.Edit]:
    """A fixed, seeded set of (scene, edit) pairs cycling through the edit kinds, rendered at ``res`` px
    (the same scenes and edits at every resolution)."""
    return [
        scenes.make_edit(
            scenes.sample_scene(seed * 1_000_003 + i), scenes.EDIT_KINDS[i % len(scenes.EDIT_KINDS)], i, res=res
        )
        for i in range(count)
    ]


def blend_words(edit: scenes.Edit) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Prompt-to-prompt local-blend words, (source words, target words): the changed words, or the object's shape
    word for pattern edits."""
    if edit.kind == "pattern":
        shape = (edit.source_scene.objects[edit.object_index].shape,)
        return (shape, shape)
    return (edit.source_words, edit.target_words)


def object_words(edit: scenes.Edit) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Local-blend words naming what to keep (`LocalBlend(keep=True)`), (source words, target words): every object's
    pattern, colour and shape words, which a background edit leaves in both prompts (its new colour is one no
    object has)."""

    def words(scene: scenes.Scene) -> tuple[str, ...]:
        return tuple(dict.fromkeys(word for obj in scene.objects for word in obj.words[1:]))

    return words(edit.source_scene), words(edit.target_scene)


def compact_json(value) -> str:
    """Benchmark records as JSON with floats cut to 6 significant digits and no indentation: a 200-pair run's
    per-item records are a third of their full-precision size, and every figure a table shows survives."""

    def cut(v):
        if isinstance(v, float):
            return float(f"{v:.6g}")
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return [cut(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(cut(value), separators=(",", ":"))


def judge_size(image: torch.Tensor) -> torch.Tensor:
    """The judge is calibrated on 64 px renders; a larger render of the same scene, area-downsampled to 64 px,
    is what a 64 px render is (1 px anti-aliased edges aside)."""
    if image.shape[-1] == scenes.W:
        return image
    return F.interpolate(image[None].float(), size=(scenes.H, scenes.W), mode="area")[0]


def attribute_ok(image: torch.Tensor, edit: scenes.Edit) -> bool:
    """Does the edited object (or the background) have the target's attributes? Any image size."""
    verdict = judge_module.judge(judge_size(image), edit.target_scene, check_pattern=edit.kind == "pattern")
    return verdict.background_ok if edit.object_index is None else verdict.objects[edit.object_index].ok


def objects_kept(image: torch.Tensor, edit: scenes.Edit) -> bool:
    """Is every object there exactly once, at its place, in its colour and its shape? An edit must neither lose,
    move nor duplicate objects. Whether the edited object took its new colour or shape is `attribute_ok`'s to
    judge, so here it may keep the old one: a colour swap that misses leaves its object kept, not lost."""
    image = judge_size(image)
    target = judge_module.judge(image, edit.target_scene).objects
    source = target if edit.object_index is None else judge_module.judge(image, edit.source_scene).objects

    def kept(verdict, any_shape: bool = False) -> bool:
        return verdict.found and verdict.duplicates == 0 and verdict.in_place and (verdict.shape_ok or any_shape)

    return all(
        kept(new, any_shape=edit.kind == "shape") or kept(old) if k == edit.object_index else kept(new)
        for k, (new, old) in enumerate(zip(target, source))
    )


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn):
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


def evaluate(pipe, pairs, methods=tuple(METHODS), steps: int = 50, batch_size: int = 50, guidance_scale: float = 7.5):
    """Run every method on every pair. Returns per-pair records and the edited images (for grids)."""
    device = pipe._execution_device
    records = {name: [] for name in methods}
    recon = {"ddim+cfg": [], "npi": [], "nti": []}
    images = {name: [] for name in methods}
    needs_nti = any(METHODS[name][0] == "nti" for name in methods)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        sources = torch.stack([edit.source_image for edit in batch])
        captions = [edit.source_caption for edit in batch]
        npi, npi_time = _timed(
            device, lambda: pipe.invert(list(sources), captions, num_inference_steps=steps, inversion_method="npi")
        )
        # DDIM and Direct Inversion edit the same guidance-1 trajectory as NPI
        inversions = {
            method: (dataclasses.replace(npi, method=method), npi_time) for method in ("npi", "ddim", "direct")
        }
        if needs_nti:
            inversions["nti"] = _timed(
                device,
                lambda: pipe.invert(
                    list(sources),
                    captions,
                    num_inference_steps=steps,
                    inversion_method="nti",
                    guidance_scale=guidance_scale,
                ),
            )
        for name, method in (("ddim+cfg", "ddim"), ("npi", "npi"), ("nti", "nti")):
            if method in inversions:
                out = pipe(inversion=inversions[method][0], guidance_scale=guidance_scale, output_type="pt").images
                recon[name] += [psnr(o.cpu(), s) for o, s in zip(out, sources)]
        for name in methods:
            method, call, p2p = METHODS[name]
            inversion, inversion_time = inversions[method]
            kwargs = dict(call)
            if p2p is not None:
                words = [blend_words(edit) for edit in batch] if len(batch) > 1 else blend_words(batch[0])
                kwargs["attention_control"] = pipe.PromptToPrompt(**p2p, local_blend=pipe.LocalBlend(words))
            edited, edit_time = _timed(
                device,
                lambda: pipe(
                    prompt=[e.target_caption for e in batch],
                    inversion=inversion,
                    guidance_scale=guidance_scale,
                    output_type="pt",
                    **kwargs,
                ).images.cpu(),
            )
            seconds = (inversion_time + edit_time) / len(batch)
            for edit, image in zip(batch, edited):
                records[name].append(
                    {
                        "kind": edit.kind,
                        "edit_psnr": psnr(image, edit.target_image),
                        "edit_ssim": ssim(image, edit.target_image),
                        "unedited_psnr": psnr(image, edit.source_image, ~edit.mask[None]),
                        "attribute_ok": attribute_ok(image, edit),
                        "seconds": seconds,
                    }
                )
                images[name].append(image)
    return {"records": records, "reconstruction_psnr": recon, "images": images}


def summarise(result) -> dict:
    """Means per method (and per edit kind) of every metric."""

    def mean(values):
        values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
        return sum(values) / len(values) if values else float("nan")

    summary = {"reconstruction_psnr": {k: mean(v) for k, v in result["reconstruction_psnr"].items() if v}}
    methods = {}
    for name, rows in result["records"].items():
        entry = {
            key: mean([float(r[key]) for r in rows]) for key in ("edit_psnr", "edit_ssim", "unedited_psnr", "seconds")
        }
        entry["attribute_accuracy"] = mean([float(r["attribute_ok"]) for r in rows])
        entry["by_kind"] = {
            kind: {
                "edit_psnr": mean([r["edit_psnr"] for r in rows if r["kind"] == kind]),
                "attribute_accuracy": mean([float(r["attribute_ok"]) for r in rows if r["kind"] == kind]),
            }
            for kind in sorted({r["kind"] for r in rows})
        }
        methods[name] = entry
    summary["methods"] = methods
    return summary


def markdown_table(summary) -> str:
    lines = [
        "| method | edit PSNR (dB) | edit SSIM | unedited PSNR (dB) | attribute acc. | s / image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary["methods"].items():
        lines.append(
            f"| {name} | {m['edit_psnr']:.2f} | {m['edit_ssim']:.3f} | {m['unedited_psnr']:.2f} |"
            f" {100 * m['attribute_accuracy']:.1f}% | {m['seconds']:.3f} |"
        )
    recon = summary["reconstruction_psnr"]
    lines += ["", "| inversion | reconstruction PSNR (dB) |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in recon.items()]
    return "\n".join(lines)


def example_grid(pairs, result, count: int = 8, scale: int = 2, row_labels=None):
    """Palette image grid: one row per example, columns input, ground truth, then each method. ``row_labels``: text
    above each row (lines split on newlines: the demo's prompts); column titles above the first."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(result["images"])
    cell = scenes.W * scale
    font = ImageFont.load_default(size=max(12, cell // 16))
    line = font.size + 6
    count = min(count, len(pairs))
    band = line * max(label.count("\n") + 1 for label in row_labels) + 4 if row_labels else 0  # labels above rows
    grid = Image.new("RGB", ((2 + len(names)) * cell, line + count * (band + cell)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(["input", "ground truth", *names]):
        draw.text((column * cell + 4, 4), title, fill="black", font=font)
    for row in range(count):
        top = line + row * (band + cell)
        if row_labels:
            draw.multiline_text((4, top + 4), row_labels[row], fill="black", font=font, spacing=6)
        tiles = [pairs[row].source_image, pairs[row].target_image] + [result["images"][n][row] for n in names]
        for column, tile in enumerate(tiles):
            array = (tile.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
            image = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
            grid.paste(image, (column * cell, top + band))
    return grid.quantize(256, dither=Image.Dither.NONE)  # a 256-colour PNG: a quarter of the bytes for these scenes


@torch.no_grad()
def model_quality(pipe, count: int = 100, steps: int = 50, seed: int = 1, res: int = MODEL_RES) -> dict:
    """The toy model's quality bars at its image size ``res``: VAE ceiling, DDIM reconstruction at w = 1, and
    caption following."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = pipe._execution_device
    specs = [scenes.sample_scene(seed * 1_000_003 + i) for i in range(count)]
    images = torch.stack([scenes.render(spec, res)["image"] for spec in specs])
    captions = [spec.caption for spec in specs]

    latents = pipe.encode_images(images.to(device) * 2 - 1)
    decoded = (pipe.decode_latents(latents).float().cpu() / 2 + 0.5).clamp(0, 1)
    inversion = pipe.invert(list(images), captions, num_inference_steps=steps, inversion_method="npi")
    ddim = pipe(inversion=dataclasses.replace(inversion, method="ddim"), guidance_scale=1.0, output_type="pt").images

    text_to_image = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    text_to_image.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = text_to_image(
        captions,
        height=res,
        width=res,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=generator,
        output_type="pt",
    ).images.cpu()
    verdicts = [judge_module.judge(judge_size(sample), spec) for sample, spec in zip(samples, specs)]
    objects = [v for verdict in verdicts for v in verdict.objects]
    return {
        "vae_psnr": sum(psnr(d, i) for d, i in zip(decoded, images)) / count,
        "ddim_w1_reconstruction_psnr": sum(psnr(r.cpu(), i) for r, i in zip(ddim, images)) / count,
        "text_to_image_object_accuracy": sum(o.found and o.shape_ok for o in objects) / len(objects),
        "text_to_image_sample_accuracy": sum(all(o.found and o.shape_ok for o in v.objects) for v in verdicts) / count,
        "samples": samples,
    }
