#!/usr/bin/env python
"""Wall-clock speed of NegativePromptInversionPipeline and its peers on the Stable Diffusion 1.5 or SDXL architecture.

    python benchmarks/speed.py --out DIR [--model sd15|sdxl] [--device cuda] [--steps 50] [--size 512]
                               [--repeats 5] [--modes eager cuda_graphs compiled] [--quick]

Everything runs in ONE process on RANDOM weights built from configs written out below (no downloads): the
SD 1.5 UNet (860M), the SD VAE, the CLIP ViT-L/14 text encoder, an offline CLIP BPE tokenizer and SD's DDIM
schedule; with ``--model sdxl`` SDXL base's UNet (2.6B), VAE (run in float32 for encode/decode, as its config asks)
and its two text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14) at 1024 px. Timings do not depend on the weights' values, only on the architecture, dtype, resolution and the
number and batch size of the UNet calls (which every row reports: ``pipe.count_unet_calls()`` for ours, which also
sees CUDA-graph replays; a forward pre-hook on the UNet for the peers).

Rows (each a median of the timed runs after ``--warmup`` untimed runs; torch.cuda.synchronize around each):

  ours (NPI), in three modes: ``eager``; ``cuda_graphs`` (``pipe.enable_cuda_graphs()``); ``compiled`` (a
  channels-last UNet and ``pipe.enable_cuda_graphs(compile=True)``, the rows of COMPILED_ROWS: each new batch size
  compiles for about a minute); and on request ``regional`` (the same with ``compile="regional"``). Graphs and
  compiled code persist across the rows of a mode, as across a user's calls; the first call (capture, compilation)
  is the warm-up and is reported.
    - invert alone (text + VAE encode + 50 DDIM inversion steps)
    - reconstruction ``pipe(inversion=inv)``  (50 steps + VAE decode to PIL)
    - P2P edit, 1 target   (word swap, cross 0.4 / self 0.6, local blend)
    - P2P edit, 4 targets from one inversion
    - ProxNPI edit         (``proximal_guidance="soft"``)
    - MasaCtrl edit        (``attention_control="masactrl"``)
    - invert + P2P edit (1 target) incl. VAE encode and decode: the headline
  ours (NTI), with CUDA graphs: ``invert(..., inversion_method="nti")`` with the pipeline defaults (10 inner steps,
    the reference's early stop, ``null_text_init="prompt"``), one P2P edit from it, and the paper's
    ``null_text_init="null"``.
  peers (eager): core diffusers ``LEditsPPPipelineStableDiffusion`` invert + edit on the same modules, and a
    hand-written classifier-free-guidance loop (50 DDIM steps, batch 2, decode).

The compiled rows run last, and a compiled row starts only while ``--compile-reserve`` seconds of the time budget
are left (a compilation cannot be cut short). SDXL (``--model sdxl``, 1024 px by default) runs a shorter set that
fits one GPU session: NPI invert, P2P edit (1 target) and the headline in every mode; LEDITS++ SDXL
(``LEditsPPPipelineStableDiffusionXL``) on the same modules; NTI invert and its P2P edit (not the ``"null"``
initialisation, whose 10 inner steps per timestep at 1024 px cost minutes).

Every row also reports its UNet TFLOP/s (FLOPs counted by ``torch.utils.flop_counter``), that as a fraction of a
bfloat16 matrix-product peak measured in the same process, and where its time goes (UNet, attention, VAE, text
encoders, other): ``benchmarks/utilisation.py``. ``--fp8`` runs the UNet's linear layers in FP8
(``pipe.enable_fp8()``).

Writes DIR/speed.json (rows + metadata, rewritten after every row so a killed run keeps partial results) and
DIR/speed.md (the table), and prints the table last. ``--quick`` is a smoke test: 5 steps, 256 px, 1 repeat,
2 NTI inner steps; on a CPU it also switches to a tiny model of the same block layout (``--model tiny``, or
``tiny-sdxl`` for ``--model sdxl``), since one SD 1.5 UNet forward takes tens of seconds on a small CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

T0 = time.perf_counter()

import diffusers
import numpy as np
import PIL.Image
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from benchmarks.utilisation import (
    AttentionTimes,
    ComponentTimer,
    compile_stats,
    format_breakdown,
    format_utilisation,
    measure_peak,
    row_utilisation,
    unet_inputs,
    unet_work,
)
from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    NegativePromptInversionPipeline,
    PromptToPrompt,
    UNetCallLog,
    _CUDAGraphUNet,
)
from toy_world.tokenizer import write_word_tokenizer
from toy_world.train import SCHEDULER_CONFIG  # Stable Diffusion's noise schedule, as the toy model's


# =================================================================================================================
# Configs


# SDXL's two text towers at tiny widths (CPU smoke tests)
TINY_CLIP = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
)
# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14): SD 1.5's text encoder and SDXL's first
CLIP_VIT_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)
# Stable Diffusion 1.5's VAE (SDXL's has the same layout: SDXL_VAE_CHANGES)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# The same block layout at tiny widths (CPU smoke tests)
TINY_VAE = dict(SD_VAE, block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256)
# SDXL's VAE: SD's, retrained with another latent scale and kept in float32 under float16 pipelines
SDXL_VAE_CHANGES = dict(scaling_factor=0.13025, force_upcast=True)

MODELS = {
    # Stable Diffusion 1.5 (runwayml / stable-diffusion-v1-5 configs)
    "sd15": {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            center_input_sample=False,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": SD_VAE,
        "text": CLIP_VIT_L,
    },
    # Same block layout, tiny widths: only for smoke tests on a CPU.
    "tiny": {
        "unet": dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=1,
            norm_num_groups=32,
            cross_attention_dim=64,
            attention_head_dim=8,
        ),
        "vae": TINY_VAE,
        "text": TINY_CLIP,
    },
    # SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs)
    "sdxl": {
        "unet": dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            center_input_sample=False,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "vae": dict(SD_VAE, **SDXL_VAE_CHANGES, sample_size=1024),
        "text": CLIP_VIT_L,
        # OpenCLIP ViT-bigG/14 text tower with its projection (text_encoder_2)
        "text_2": dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
            layer_norm_eps=1e-5,
        ),
    },
    # SDXL's block layout (no attention at full resolution, transformer depth 2 below), tiny widths: CPU smoke tests.
    "tiny-sdxl": {
        "unet": dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=32,
            cross_attention_dim=128,
            attention_head_dim=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
        ),
        "vae": dict(TINY_VAE, **SDXL_VAE_CHANGES),
        "text": TINY_CLIP,
        "text_2": dict(TINY_CLIP, hidden_act="gelu"),  # OpenCLIP's activation, as SDXL's second encoder
    },
}
TINY_MODELS = {"sd15": "tiny", "sdxl": "tiny-sdxl"}  # the same block layout at tiny widths, for --quick on a CPU
MODEL_LABELS = {
    "sd15": "Stable Diffusion 1.5 architecture",
    "sdxl": "SDXL base 1.0 architecture",
    "tiny": "tiny SD-layout model (smoke test)",
    "tiny-sdxl": "tiny SDXL-layout model (smoke test)",
}

SOURCE_WORD, TARGET_WORDS = "cat", ("dog", "tiger", "horse", "bear")
SOURCE = f"a photo of a {SOURCE_WORD} sitting on a wall"
TARGETS = [SOURCE.replace(SOURCE_WORD, word) for word in TARGET_WORDS]
WORDS = "a photo of the sitting standing on wall".split() + [SOURCE_WORD, *TARGET_WORDS]


# =================================================================================================================
# Construction


def construct(factory, device: torch.device, dtype: torch.dtype, seed: int):
    """Random init directly on the device (fast on a GPU), then cast; falls back to CPU init + move."""
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            module = factory()
    except Exception as error:  # noqa: BLE001
        log(f"  init on {device} failed ({type(error).__name__}: {error}); initialising on the CPU instead")
        module = factory()
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_components(model: str, device: torch.device, dtype: torch.dtype, workdir: Path) -> dict:
    configs = MODELS[model]
    folder = write_word_tokenizer(workdir / "tokenizer", WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert max(tokenizer.get_vocab().values()) < configs["text"]["vocab_size"]
    unet = construct(lambda: UNet2DConditionModel(**configs["unet"]), device, dtype, 0)
    with torch.no_grad():  # a small ε keeps 50-step DDIM round trips finite on random weights; no effect on speed
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.mul_(0.05)
    vae = construct(lambda: AutoencoderKL(**configs["vae"]), device, dtype, 1)

    def text_config(config: dict, tok: CLIPTokenizer) -> CLIPTextConfig:
        return CLIPTextConfig(
            **config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )

    text_encoder = construct(lambda: CLIPTextModel(text_config(configs["text"], tokenizer)), device, dtype, 2)
    components = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": DDIMScheduler(**SCHEDULER_CONFIG),
    }
    if "text_2" in configs:  # SDXL: the second tokenizer pads with "!", as SDXL's
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, pad_token="!")
        components["tokenizer_2"] = tokenizer_2
        components["text_encoder_2"] = construct(
            lambda: CLIPTextModelWithProjection(text_config(configs["text_2"], tokenizer_2)), device, dtype, 3
        )
    return components


def random_image(size: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# =================================================================================================================
# Measuring


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def hooked_unet_calls(unet):
    """UNet calls of the peers, which run the UNet outside our pipeline (ours count with
    ``pipe.count_unet_calls()``, which also sees CUDA-graph replays): a forward pre-hook sees every eager forward."""
    log = UNetCallLog()

    def record(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        log.calls.append((int(sample.shape[0]), torch.is_grad_enabled()))

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield log
    finally:
        handle.remove()


def measure(
    fn,
    repeats: int,
    warmup: int,
    device: torch.device,
    count_calls=None,
    deadline: float | None = None,
    before_run=None,
    components=None,
) -> dict:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and peak GPU memory.

    The UNet calls of the first run (warm-up or timed) are counted with ``count_calls()``, a context manager
    yielding a `UNetCallLog`. Timed runs stop early past ``deadline`` (a ``time.perf_counter`` value), keeping at
    least one. ``before_run()``, if given, is called right before each run starts its clock (a barrier that makes
    several processes start together). ``components()``, if given, is a `ComponentTimer` for each timed run; the
    breakdown of the run at the median is returned (its events cost microseconds per UNet call, on the host only).
    """
    counts = None

    def timed_run(timer=None):
        """One synchronised run of ``fn``; the UNet calls of the very first run are counted."""
        nonlocal counts
        counting = count_calls if count_calls is not None and counts is None else contextlib.nullcontext
        if before_run is not None:
            before_run()
        with counting() as log, timer or contextlib.nullcontext():
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            seconds = time.perf_counter() - start
        counts = counts or log
        return result, seconds, timer and timer.breakdown(seconds)

    warmup_times = []
    for _ in range(warmup):
        result, seconds, _ = timed_run()
        warmup_times.append(seconds)
    times, breakdowns, peak = [], [], 0
    for _ in range(repeats):
        gc.collect()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result, seconds, parts = timed_run(components and components())
        times.append(seconds)
        breakdowns.append(parts)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device))
        if deadline is not None and time.perf_counter() > deadline:
            break
    return {
        "median_s": statistics.median(times),
        "times_s": times,
        "warmup_times_s": warmup_times,
        "peak_mem_gib": peak / 2**30 if device.type == "cuda" else None,
        "breakdown": breakdowns[sorted(range(len(times)), key=times.__getitem__)[(len(times) - 1) // 2]],
        "counts": counts,
        "result": result,
    }


def set_pipeline_mode(pipe: NegativePromptInversionPipeline, mode: str) -> None:
    """eager; cuda_graphs (``enable_cuda_graphs()``); compiled / regional (channels-last UNet +
    ``enable_cuda_graphs(compile=True)`` / ``compile="regional"``)."""
    pipe.disable_cuda_graphs()
    pipe.unet.to(memory_format=torch.channels_last if mode in COMPILE_MODES else torch.contiguous_format)
    if mode != "eager":
        pipe.enable_cuda_graphs(compile=COMPILE_MODES.get(mode, False))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of speed.py and batch.py alike: FP8, utilisation, the regional mode's variants."""
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="pipe.enable_fp8() (torchao, FP8 linear layers; CUDA sm_89+; bfloat16, the default then)",
    )
    parser.add_argument(
        "--no-utilisation",
        action="store_true",
        help="skip the peak matrix product, the FLOP count and the breakdown of each row",
    )
    parser.add_argument(
        "--regional-dynamic",
        action="store_true",
        help="regional mode compiles its blocks with dynamic shapes (fewer compilations)",
    )
    parser.add_argument(
        "--regional-blocks",
        nargs="+",
        default=None,
        help="block class names the regional mode compiles (default: the pipeline's choice)",
    )


def prepare_run(pipe, args, device: torch.device, dtype: torch.dtype, meta: dict, say=log):
    """Before any row: the utilisation basis (peak rate; the eager UNet's FLOPs and attention shapes per sample),
    then FP8 if asked, then the regional mode's settings. Returns ``(work, peak, attention)``, `None`s without
    utilisation."""
    work = peak = attention = None
    if not args.no_utilisation:
        peak = measure_peak(device)
        work = unet_work(pipe, args.size, device, dtype)
        attention = AttentionTimes(work["attention_calls"], device)
        meta.update(
            peak,
            unet_gflop_per_sample=work["flops_per_sample"] / 1e9,
            attention_calls_per_sample=len(work["attention_calls"]),
        )
        say(
            f"peak {peak['peak_tflops']:.4g} TFLOP/s ({peak['peak_matmul']}); UNet "
            f"{meta['unet_gflop_per_sample']:.1f} GFLOP per sample, {len(work['attention_calls'])} attention calls"
        )
    if args.fp8:  # after the FLOP count, which runs the eager bfloat16 UNet
        meta["linear_layers"] = sum(isinstance(module, torch.nn.Linear) for module in pipe.unet.modules())
        meta["fp8_linear_layers"] = pipe.enable_fp8()
        say(f"FP8: {meta['fp8_linear_layers']} of {meta['linear_layers']} UNet linear layers")
    if args.regional_dynamic:  # experiments only: the pipeline's defaults otherwise
        _CUDAGraphUNet.regional_dynamic = True
    if args.regional_blocks:
        _CUDAGraphUNet.regional_blocks = tuple(args.regional_blocks)
    meta["regional"] = {"blocks": _CUDAGraphUNet.regional_blocks, "dynamic": _CUDAGraphUNet.regional_dynamic}
    return work, peak, attention


def summarize_calls(log: UNetCallLog | None) -> dict:
    if log is None:
        return {"unet_calls": None, "unet_samples": None, "samples_per_call": None, "unet_calls_with_grad": None}
    sizes = Counter(size for size, _ in log.calls)
    no_grad = Counter(size for size, grad in log.calls if not grad)
    return {
        "unet_calls": len(log.calls),
        "unet_samples": sum(size for size, _ in log.calls),
        "samples_per_call": {str(size): sizes[size] for size in sorted(sizes)},
        "unet_calls_with_grad": sum(1 for _, grad in log.calls if grad),
        "unet_samples_no_grad": sum(size * count for size, count in no_grad.items()),
        "samples_per_call_no_grad": {str(size): no_grad[size] for size in sorted(no_grad)},
        "graph_captures": log.captures,
    }


def format_per_call(per_call: dict | None) -> str:
    if not per_call:
        return ""
    if len(per_call) == 1:
        return next(iter(per_call))
    return ", ".join(f"{size}×{count}" for size, count in per_call.items())


# =================================================================================================================
# Peers


def plain_cfg_loop(components: dict, prompt: str, steps: int, size: int, guidance_scale: float = 7.5):
    """What a user writes by hand: encode prompts, DDIM with the batch doubled for CFG, decode."""
    unet, vae, tokenizer, text_encoder = (components[k] for k in ("unet", "vae", "tokenizer", "text_encoder"))
    device, dtype = unet.device, unet.dtype
    with torch.no_grad():
        tokens = tokenizer(
            ["", prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds = text_encoder(tokens.input_ids.to(device))[0].to(dtype)
        scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps, device=device)
        generator = torch.Generator(device).manual_seed(0)
        latents = torch.randn((1, 4, size // 8, size // 8), generator=generator, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise = unet(model_input, t, encoder_hidden_states=embeds).sample
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).float().cpu().permute(0, 2, 3, 1).numpy()
    return [PIL.Image.fromarray((im * 255).round().astype(np.uint8)) for im in image]


def ledits_pipeline(components: dict):
    from diffusers import (
        LEditsPPPipelineStableDiffusion,
        LEditsPPPipelineStableDiffusionXL,
    )

    # LEDITS++ mutates its scheduler's config, so it gets its own: DPM-Solver++ (SDE), the one its docs recommend.
    scheduler = DPMSolverMultistepScheduler.from_config(
        components["scheduler"].config, algorithm_type="sde-dpmsolver++", solver_order=2
    )
    shared = {name: components[name] for name in ("vae", "text_encoder", "tokenizer", "unet")}
    if "text_encoder_2" in components:
        pipe = LEditsPPPipelineStableDiffusionXL(
            **shared,
            text_encoder_2=components["text_encoder_2"],
            tokenizer_2=components["tokenizer_2"],
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = LEditsPPPipelineStableDiffusion(
            **shared, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# =================================================================================================================
# Output


def write_outputs(out: Path, meta: dict, rows: list[dict]) -> str:
    payload = {"metadata": meta, "rows": rows, "derived": derived(rows, meta.get("weights_gib"))}
    tmp = out / "speed.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out / "speed.json")
    table = markdown(meta, rows, payload["derived"])
    (out / "speed.md").write_text(table)
    return table


def find(rows, name, mode):
    for row in rows:
        if row["name"] == name and row["mode"] == mode and row.get("median_s") is not None:
            return row
    return None


def derived(rows: list[dict], weights_gib: float | None = None) -> dict:
    result = {}
    for mode in MODES:
        one, four = find(rows, "NPI P2P edit, 1 target", mode), find(rows, "NPI P2P edit, 4 targets", mode)
        invert, headline = find(rows, "NPI invert", mode), find(rows, HEADLINE, mode)
        if one and four:
            result[f"p2p_4_over_1_edit_{mode}"] = four["median_s"] / one["median_s"]
        if invert and four and headline:
            result[f"p2p_4_over_1_end_to_end_{mode}"] = (invert["median_s"] + four["median_s"]) / headline["median_s"]
        if headline:
            result[f"headline_s_{mode}"] = headline["median_s"]
    result["speedup_vs_eager"] = {
        f"{row['name']} [{row['mode']}]": eager["median_s"] / row["median_s"]
        for row in rows
        if row["mode"] != "eager" and row.get("median_s") and (eager := find(rows, row["name"], "eager"))
    }
    invert, edit = find(rows, "NTI invert", "cuda_graphs"), find(rows, "NTI P2P edit, 1 target", "cuda_graphs")
    if invert and edit:
        result["nti_invert_plus_edit_s"] = invert["median_s"] + edit["median_s"]
    headlines = [row for mode in MODES if (row := find(rows, HEADLINE, mode))]
    if headlines:
        best = min(headlines, key=lambda row: row["median_s"])
        result["headline_s"], result["headline_mode"] = best["median_s"], best["mode"]
        ledits = find(rows, "LEDITS++ invert + edit", "eager")
        if ledits:
            result["ledits_over_headline"] = ledits["median_s"] / best["median_s"]
        nti_peaks = [row["peak_mem_gib"] for row in (invert, edit) if row and row.get("peak_mem_gib")]
        if best.get("peak_mem_gib") and nti_peaks:
            npi_peak, nti_peak = best["peak_mem_gib"], max(nti_peaks)
            result["peak_mem_npi_over_nti"] = npi_peak / nti_peak
            if weights_gib:
                result["activation_mem_npi_over_nti"] = (npi_peak - weights_gib) / (nti_peak - weights_gib)
    return result


def markdown(meta: dict, rows: list[dict], extra: dict) -> str:
    lines = [
        f"## Speed on {meta['device_name']}",
        "",
        f"{meta['model_label']}, random weights, {meta['dtype']}, {meta['size']}×{meta['size']} px, "
        f"{meta['steps']} DDIM steps, one image, one process. Median of the timed runs (column Runs) after "
        f"{meta['warmup']} warm-up run(s); NTI inversions without warm-up. torch {meta['torch']}, "
        f"diffusers {meta['diffusers']}, transformers {meta['transformers']}, Python {meta['python']}"
        + (f", CUDA {meta['cuda']}" if meta.get("cuda") else "")
        + ".",
        "",
        "Modes: `eager`; `cuda_graphs` = `pipe.enable_cuda_graphs()`; `compiled` = channels-last UNet + "
        '`pipe.enable_cuda_graphs(compile=True)`; `regional` = the same with `compile="regional"`. Graphs and '
        "compiled code persist across calls, as in a user's session; the first call of each kind (capture, "
        "compilation) is the warm-up, reported in Notes."
        + (
            f" UNet linear layers in FP8 (`pipe.enable_fp8()`): {meta['fp8_linear_layers']} of "
            f"{meta['linear_layers']}."
            if meta.get("fp8_linear_layers") is not None
            else ""
        ),
        "",
        utilisation_note(meta),
        "",
        "| Row | Mode | Median s | Runs | vs eager | UNet TFLOP/s | % peak | Breakdown s | Peak GiB | UNet calls | "
        "Samples/call | Notes |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for row in rows:
        median = f"{row['median_s']:.3f}" if row.get("median_s") is not None else "—"
        runs = str(len(row.get("times_s") or []))
        speedup = extra["speedup_vs_eager"].get(f"{row['name']} [{row['mode']}]")
        peak = f"{row['peak_mem_gib']:.2f}" if row.get("peak_mem_gib") is not None else "—"
        calls = "" if row.get("unet_calls") is None else str(row["unet_calls"])
        if calls and row.get("unet_calls_with_grad"):
            calls += f" ({row['unet_calls_with_grad']} with grad)"
        if calls and row.get("counts_from") == "eager run":
            calls += "†"
        notes = [row.get("note") or ""]
        if row["mode"] != "eager" and row.get("warmup_times_s"):
            captures = row.get("graph_captures")
            notes.append(
                f"first call {row['warmup_times_s'][0]:.1f} s"
                + (f" ({captures} graph capture(s))" if captures else "")
            )
        notes = "; ".join(filter(None, notes))
        if row.get("error"):
            notes = f"**error**: {row['error']}"[:300]
        name = f"**{row['name']}**" if row["name"] == HEADLINE else row["name"]
        rate, share = format_utilisation(row)
        lines.append(
            f"| {name} | {row['mode']} | {median} | {runs} | {f'{speedup:.2f}×' if speedup else ''} | {rate} | "
            f"{share} | {format_breakdown(row)} | {peak} | {calls} | {format_per_call(row.get('samples_per_call'))} | "
            f"{notes.replace('|', '/')} |"
        )
    lines.append("")
    if any(row.get("counts_from") == "eager run" for row in rows):
        lines.append("† counted on the eager run of the same row: CUDA-graph replays bypass the UNet's forward hooks.")
    if not meta["device"].startswith("cuda"):
        lines.append("On a CPU `enable_cuda_graphs` does nothing: every mode runs eagerly.")
    lines.append(
        "Every row includes text encoding; invert rows include VAE encode, edit rows VAE decode to PIL. "
        "UNet calls count logical calls (a replayed graph counts as one call)."
    )
    lines.append("")
    for mode in MODES:
        facts = []
        if (key := f"headline_s_{mode}") in extra:
            facts.append(f"headline {extra[key]:.3f} s")
        if (key := f"p2p_4_over_1_edit_{mode}") in extra:
            facts.append(f"P2P 4 targets / 1 target: edit {extra[key]:.2f}×")
        if (key := f"p2p_4_over_1_end_to_end_{mode}") in extra:
            facts.append(f"invert + edit {extra[key]:.2f}×")
        if facts:
            lines.append(f"- {mode}: {', '.join(facts)}.")
    if "ledits_over_headline" in extra:
        lines.append(
            f"- LEDITS++ invert + edit / our headline ({extra['headline_mode']}): "
            f"{extra['ledits_over_headline']:.2f}×."
        )
    if "nti_invert_plus_edit_s" in extra:
        lines.append(f"- NTI invert + P2P edit (cuda_graphs): {extra['nti_invert_plus_edit_s']:.3f} s.")
    if "peak_mem_npi_over_nti" in extra:
        activation = extra.get("activation_mem_npi_over_nti")
        lines.append(
            f"- Peak memory, NPI headline / NTI: {extra['peak_mem_npi_over_nti']:.0%}"
            + (f"; above the {meta['weights_gib']:.2f} GiB of weights: {activation:.0%}" if activation else "")
            + "."
        )
    return "\n".join(lines) + "\n"


def utilisation_note(meta: dict) -> str:
    """What the utilisation columns mean, with this run's peak and FLOP count."""
    if not meta.get("peak_tflops"):
        return "Utilisation not measured."
    return (
        f"UNet TFLOP/s: the row's gradient-free UNet samples × {meta['unet_gflop_per_sample']:.1f} GFLOP per sample "
        f"(torch.utils.flop_counter on one forward) / its median time; in brackets the same over the UNet's own "
        f"time. % peak: of {meta['peak_tflops']:.4g} TFLOP/s, a {meta['peak_matmul']} matrix product measured in "
        f"this run. Breakdown (the timed run at the median; CUDA events, perf_counter on a CPU): UNet calls (attn: "
        f"their fused attention kernels timed alone at the same shapes), VAE, text encoders, other = the rest of "
        f"the wall time."
    )


HEADLINE = "NPI invert + P2P edit (1 target) incl. VAE"
MODES = ("eager", "cuda_graphs", "compiled", "regional")
COMPILE_MODES = {"compiled": True, "regional": "regional"}  # mode -> enable_cuda_graphs(compile=...)
COMPILED_ROWS = (
    "NPI invert",
    "NPI reconstruction",
    "NPI P2P edit, 1 target",
    "DI P2P edit, 1 target",
    "NPI P2P edit, 4 targets",
    HEADLINE,
)
SDXL_ROWS = ("NPI invert", "NPI P2P edit, 1 target", HEADLINE)


# =================================================================================================================
# Main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for speed.json and speed.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (50; --quick: 5)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (512, SDXL 1024; --quick: 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per fast row (5; --quick: 1)")
    parser.add_argument("--eager-repeats", type=int, default=None, help="timed runs per eager row (2; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument(
        "--peer-repeats", type=int, default=None, help="timed runs of LEDITS++ and NTI-edit rows (2; --quick: 1)"
    )
    parser.add_argument(
        "--nti-repeats", type=int, default=None, help="timed runs of the NTI inversion row (no warm-up; 3; --quick: 1)"
    )
    parser.add_argument(
        "--nti-inner-steps", type=int, default=None, help="NTI inner steps (pipeline default 10; --quick: 2)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 5 steps, 256 px, 1 repeat, 2 NTI inner steps"
    )
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=None,
        help="sd15 (default), sdxl, or their tiny layouts tiny / tiny-sdxl (what --quick on a CPU runs instead)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="float16 on CUDA, float32 on CPU by default",
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch.set_num_threads on CPU (default: torch's choice; 1 for --quick on a CPU, which"
        " avoids oversubscription on small shared machines)",
    )
    parser.add_argument("--only", default=None, help="regex: run only rows whose name matches")
    parser.add_argument("--no-nti", action="store_true", help="skip the NTI rows")
    parser.add_argument("--no-peers", action="store_true", help="skip LEDITS++ and the plain CFG loop")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=["eager", "cuda_graphs", "compiled"],
        help="modes of our rows (default: eager cuda_graphs compiled; compiled and regional: CUDA only,"
        " each new batch size compiles for ~1.5 min (whole model) on an H100)",
    )
    add_run_options(parser)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=480.0,
        help="seconds since start after which remaining rows are skipped and repeats cut short",
    )
    parser.add_argument(
        "--compile-reserve",
        type=float,
        default=150.0,
        help="a compiled row starts only while this many seconds of the budget are left (compiling"
        " a new batch size takes 1–2.5 min and cannot be cut short)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick and device.type == "cpu" and args.model in (None, "sdxl"):
        args.model = TINY_MODELS[args.model or "sd15"]
    args.model = args.model or "sd15"
    args.steps = args.steps or (5 if args.quick else 50)
    args.size = args.size or (256 if args.quick else 1024 if args.model == "sdxl" else 512)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.eager_repeats = args.eager_repeats or (1 if args.quick else 2)
    args.nti_repeats = args.nti_repeats or (1 if args.quick else 3)
    args.peer_repeats = args.peer_repeats or (1 if args.quick else 2)
    if args.nti_inner_steps is None and args.quick:
        args.nti_inner_steps = 2
    if args.dtype is None:
        args.dtype = "bfloat16" if args.fp8 else "float16" if device.type == "cuda" else "float32"
    if args.cpu_threads is None and args.quick and device.type == "cpu":
        args.cpu_threads = 1
    return args


class Benchmark:
    """One process's run: the models, the pipeline, the rows measured so far and what rows share (inversions, the
    current mode). Each row group is one method; ``main`` calls them in order."""

    def __init__(self, args):
        self.args = args
        self.device, self.dtype = torch.device(args.device), getattr(torch, args.dtype)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.deadline = T0 + args.time_budget
        self.meta = run_metadata(args, self.device)
        self.rows: list[dict] = []
        self.state: dict = {}  # results shared between rows (inversions)
        self.mode = None
        log(
            f"device {self.meta['device_name']}, torch {self.meta['torch']}, diffusers {self.meta['diffusers']}, "
            f"transformers {self.meta['transformers']}; model {args.model}, {args.dtype}, {args.size}px, "
            f"{args.steps} steps"
        )

        start = time.perf_counter()
        self.components = build_components(
            args.model, self.device, self.dtype, Path(tempfile.mkdtemp(prefix="npi-speed-"))
        )
        synchronize(self.device)
        self.meta["params_m"] = {
            name: round(sum(p.numel() for p in self.components[name].parameters()) / 1e6, 1)
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if name in self.components
        }
        self.meta["build_s"] = time.perf_counter() - start
        self.meta["weights_gib"] = (
            torch.cuda.memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        )
        log(f"built models in {self.meta['build_s']:.1f}s: {self.meta['params_m']} M params")
        self.pipe = NegativePromptInversionPipeline(  # the rows time NPI, as they are labelled
            **self.components, safety_checker=None, feature_extractor=None, inversion_method="npi"
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.default_processors = dict(self.components["unet"].attn_processors)
        self.work, self.peak, self.attention = prepare_run(self.pipe, args, self.device, self.dtype, self.meta, log)
        self.image = random_image(args.size)
        write_outputs(args.out, self.meta, self.rows)

    # ---- shared by the rows ----------------------------------------------------------------------------------------

    def invert(self, **kwargs):
        args = self.args
        return self.pipe.invert(
            self.image, SOURCE, num_inference_steps=args.steps, height=args.size, width=args.size, **kwargs
        )

    def inversion(self, key: str, **kwargs):
        """The inversion an edit row starts from: the one the invert row produced, else made now (untimed)."""
        if key not in self.state:
            self.state[key] = self.invert(**kwargs)
        return self.state[key]

    def set_mode(self, mode: str) -> None:
        """eager; cuda_graphs (``enable_cuda_graphs()``); compiled (channels-last UNet +
        ``enable_cuda_graphs(compile=True)``). Graphs and compiled code persist across rows of one mode, as they do
        across a user's calls."""
        if mode == self.mode:
            return
        set_pipeline_mode(self.pipe, mode)
        self.mode = mode

    def run_row(
        self,
        name: str,
        group: str,
        mode: str,
        fn,
        repeats: int,
        warmup: int,
        note: str = "",
        keep: str | None = None,
        annotate=None,
        setup=None,
        ours: bool = True,
        reserve: float = 0.0,
    ):
        args, device = self.args, self.device
        if args.only and not re.search(args.only, name):
            return
        row = {"name": name, "group": group, "mode": mode, "note": note, "median_s": None, "error": None}
        if time.perf_counter() > self.deadline - reserve:
            row["error"] = f"skipped: time budget of {args.time_budget:.0f}s spent" + (
                f" (this row starts only with {reserve:.0f}s left)" if reserve else ""
            )
            self.rows.append(row)
            log(f"{name} [{mode}]: skipped (time budget)")
            write_outputs(args.out, self.meta, self.rows)
            return
        started = time.perf_counter()
        log(f"{name} [{mode}] ...")
        try:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.set_mode(mode)
            if setup is not None:
                setup()
            count_calls = self.pipe.count_unet_calls if ours else lambda: hooked_unet_calls(self.components["unet"])
            components = (
                None
                if self.work is None
                else functools.partial(ComponentTimer, self.pipe, device, unet_via="pipeline" if ours else "hooks")
            )
            stats = measure(fn, repeats, warmup, device, count_calls, self.deadline, components=components)
            result = stats.pop("result")
            row.update(stats)
            row["repeats_requested"], row["warmup"] = repeats, warmup
            row.update(summarize_calls(row.pop("counts")))
            graphs = self.pipe._cuda_graphs
            if (
                mode != "eager"
                and device.type == "cuda"
                and not row.get("graph_captures")
                and not (graphs and graphs.graphs)
            ):
                row["note"] = "; ".join(filter(None, [row["note"], "WARNING: no CUDA graph was captured"]))
            if keep:
                self.state[keep] = result
            if annotate is not None:
                row["note"] = "; ".join(filter(None, [row["note"], annotate(result)]))
            row.update(row_utilisation(row, self.work, self.peak, self.attention))
            if mode in COMPILE_MODES:
                row["compile_stats"] = compile_stats()  # the process's totals so far
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc()
            log(f"  FAILED: {row['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["row_elapsed_s"] = time.perf_counter() - started
        self.rows.append(row)
        if row["median_s"] is not None:
            peak = f", peak {row['peak_mem_gib']:.2f} GiB" if row.get("peak_mem_gib") is not None else ""
            log(
                f"  median {row['median_s']:.3f}s over {len(row['times_s'])} run(s){peak}, "
                f"UNet calls {row.get('unet_calls')} ({format_per_call(row.get('samples_per_call'))}/call); "
                f"row took {row['row_elapsed_s']:.1f}s"
            )
            if row.get("unet_tflops") is not None:
                rate, share = format_utilisation(row)
                log(f"  UNet {rate} TFLOP/s, {share} of peak; {format_breakdown(row)}")
        write_outputs(args.out, self.meta, self.rows)

    # ---- row groups ------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Kernels, allocator, cuBLAS/cuDNN handles: two plain UNet forwards before anything is timed."""
        try:
            with torch.no_grad():
                inputs = unet_inputs(self.pipe, 2, self.args.size, self.device, self.dtype)
                for _ in range(2):
                    self.pipe.unet(**inputs)
            synchronize(self.device)
            log("warm-up forwards done")
        except Exception as error:  # noqa: BLE001
            log(f"warm-up failed: {type(error).__name__}: {error}")

    def npi_rows(self, modes: list[str]) -> None:
        """Ours with NPI, in each of ``modes``: invert, reconstruct, the edits, and the headline invert + edit (SDXL:
        invert, the one-target P2P edit and the headline)."""
        args, pipe = self.args, self.pipe
        p2p = PromptToPrompt(
            cross_replace_steps=0.4, self_replace_steps=0.6, local_blend=LocalBlend((SOURCE_WORD, TARGET_WORDS[0]))
        )
        p2p_four = PromptToPrompt(
            cross_replace_steps=0.4, self_replace_steps=0.6, local_blend=LocalBlend([SOURCE_WORD, *TARGET_WORDS])
        )
        npi = lambda: self.inversion("npi")  # noqa: E731

        def headline():
            return pipe(prompt=TARGETS[0], inversion=self.invert(), attention_control=p2p, output_type="pil")

        rows = [
            ("NPI invert", self.invert, "incl. text + VAE encode"),
            ("NPI reconstruction", lambda: pipe(inversion=npi(), output_type="pil"), "incl. VAE decode"),
            (
                "NPI P2P edit, 1 target",
                lambda: pipe(prompt=TARGETS[0], inversion=npi(), attention_control=p2p, output_type="pil"),
                "word swap + local blend; incl. VAE decode",
            ),
            (
                "DI P2P edit, 1 target",  # Direct Inversion: the same inversion, the source pinned to it
                lambda: pipe(
                    prompt=TARGETS[0],
                    inversion=npi(),
                    inversion_method="direct",
                    attention_control=p2p,
                    output_type="pil",
                ),
                'the NPI row\'s rows, source pinned, targets against E(""); incl. VAE decode',
            ),
            (
                "NPI P2P edit, 4 targets",
                lambda: pipe(prompt=TARGETS, inversion=npi(), attention_control=p2p_four, output_type="pil"),
                "one inversion, 4 outputs; incl. VAE decode",
            ),
            (
                "ProxNPI edit (soft)",
                lambda: pipe(prompt=TARGETS[0], inversion=npi(), proximal_guidance="soft", output_type="pil"),
                "incl. VAE decode",
            ),
            (
                "NPI MasaCtrl edit",
                lambda: pipe(prompt=TARGETS[0], inversion=npi(), attention_control=MasaCtrl(), output_type="pil"),
                "incl. VAE decode",
            ),
            (HEADLINE, headline, "image in → edited PIL out"),
        ]
        for mode in modes:
            for name, fn, note in rows:
                if mode in COMPILE_MODES and name not in COMPILED_ROWS:
                    continue  # each new batch size / control kind costs a compilation (~1.5 min)
                if self.pipe.is_sdxl and name not in SDXL_ROWS:
                    continue
                self.run_row(
                    name,
                    "ours-npi",
                    mode,
                    fn,
                    args.eager_repeats if mode == "eager" else args.repeats,
                    args.warmup,
                    note=note,
                    keep="npi" if name == "NPI invert" else None,
                    setup=None if name in ("NPI invert", HEADLINE) else npi,
                    reserve=args.compile_reserve if mode in COMPILE_MODES else 0.0,
                )

    def peer_rows(self) -> None:
        """What users would pick instead: a hand-written CFG loop and core diffusers' LEDITS++, eagerly."""
        args, components = self.args, self.components
        if not self.pipe.is_sdxl:  # the hand-written loop encodes with one text encoder
            self.run_row(
                "plain CFG loop (hand-written)",
                "peer",
                "eager",
                lambda: plain_cfg_loop(components, TARGETS[0], args.steps, args.size),
                args.eager_repeats,
                args.warmup,
                note="text encode + DDIM, batch 2 + VAE decode",
                ours=False,
            )
        ledits = functools.cache(lambda: ledits_pipeline(components))
        generator = lambda: torch.Generator(self.device).manual_seed(0)  # noqa: E731

        def ledits_both():
            ledits().invert(
                image=self.image,
                source_prompt=SOURCE,
                num_inversion_steps=args.steps,
                height=args.size,
                width=args.size,
                generator=generator(),
            )
            # LEDITS++ SDXL's invert leaves a float16 VAE upcast to float32, and its edit then fails on float16
            # latents ("Input type (c10::Half) and bias type (float)"); cast it back, as a user would have to.
            components["vae"].to(dtype=self.dtype)
            return ledits()(
                editing_prompt=[SOURCE_WORD, TARGET_WORDS[0]],
                reverse_editing_direction=[True, False],
                edit_guidance_scale=[5.0, 10.0],
                edit_threshold=[0.9, 0.85],
                generator=generator(),
                output_type="pil",
            )

        note = (
            f"image in → edited PIL out; DPM-Solver++ SDE, source_guidance_scale 3.5, skip 0.15; edit: remove "
            f"'{SOURCE_WORD}' + add '{TARGET_WORDS[0]}'"
            + ("; VAE cast back to the model dtype between invert and edit" if self.pipe.is_sdxl else "")
        )
        try:
            self.run_row(
                "LEDITS++ invert + edit",
                "peer",
                "eager",
                ledits_both,
                args.peer_repeats,
                args.warmup,
                note=note,
                setup=ledits,
                ours=False,
            )
        finally:
            # LEDITS++ installs its own (non-SDPA) attention processors on the shared UNet; put the defaults back.
            components["unet"].set_attn_processor(self.default_processors)
            components["vae"].to(dtype=self.dtype)

    def nti_rows(self) -> None:
        """Ours with NTI, graphed: the default inversion, an edit from it, and the paper's initialisation."""
        args, pipe = self.args, self.pipe
        nti = {"inversion_method": "nti"}
        if args.nti_inner_steps is not None:
            nti["null_text_inner_steps"] = args.nti_inner_steps
        inner = pipe.config.null_text_inner_steps if args.nti_inner_steps is None else args.nti_inner_steps

        def warm_up():  # untimed: the backward kernels and the optimiser, with a 2-step, 1-inner-step NTI
            pipe.invert(
                self.image,
                SOURCE,
                num_inference_steps=2,
                height=args.size,
                width=args.size,
                inversion_method="nti",
                null_text_inner_steps=1,
            )

        def inner_used(result) -> str:
            if result is None or result.null_text_losses is None:
                return ""
            return f"inner steps used {int(torch.isfinite(result.null_text_losses).sum())}/{args.steps * inner}"

        self.run_row(
            "NTI invert",
            "ours-nti",
            "cuda_graphs",
            lambda: self.invert(**nti),
            args.nti_repeats,
            0,
            note=f"{inner} inner steps, early stop {pipe.config.null_text_early_stop:g}, init "
            f"'{pipe.config.null_text_init}' (the pipeline's defaults)",
            keep="nti",
            annotate=inner_used,
            setup=warm_up,
        )
        p2p = PromptToPrompt(
            cross_replace_steps=0.4, self_replace_steps=0.6, local_blend=LocalBlend((SOURCE_WORD, TARGET_WORDS[0]))
        )
        self.run_row(
            "NTI P2P edit, 1 target",
            "ours-nti",
            "cuda_graphs",
            lambda: pipe(
                prompt=TARGETS[0], inversion=self.inversion("nti", **nti), attention_control=p2p, output_type="pil"
            ),
            args.peer_repeats,
            args.warmup,
            note="from the NTI inversion; incl. VAE decode",
            setup=lambda: self.inversion("nti", **nti),
        )
        if self.pipe.is_sdxl:
            return  # ten inner steps per timestep from E(""): minutes at 1024 px
        self.run_row(
            "NTI invert, null_text_init='null'",
            "ours-nti",
            "cuda_graphs",
            lambda: self.invert(null_text_init="null", **nti),
            1,
            0,
            note=f"{inner} inner steps from the empty prompt's embedding, as the paper",
            annotate=inner_used,
            setup=warm_up,
        )

    def finish(self) -> int:
        self.meta["total_s"] = time.perf_counter() - T0
        table = write_outputs(self.args.out, self.meta, self.rows)
        failed = [row["name"] + f" [{row['mode']}]" for row in self.rows if row.get("error")]
        log(
            f"done in {self.meta['total_s']:.1f}s; {len(self.rows)} rows, {len(failed)} failed"
            f"{': ' + ', '.join(failed) if failed else ''}"
        )
        log(f"wrote {self.args.out / 'speed.json'} and {self.args.out / 'speed.md'}")
        print(flush=True)
        print(table, flush=True)
        return 0


def environment_metadata(device: torch.device) -> dict:
    """Device name, library versions and git commit of a run."""
    try:
        commit = (
            subprocess.run(
                ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        commit = None
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cpu_threads": torch.get_num_threads(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def run_metadata(args, device: torch.device) -> dict:
    return {
        **environment_metadata(device),
        "model": args.model,
        "model_label": MODEL_LABELS[args.model],
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "peer_repeats": args.peer_repeats,
        "nti_repeats": args.nti_repeats,
        "nti_inner_steps": args.nti_inner_steps,
        "quick": args.quick,
        "prompts": {"source": SOURCE, "targets": TARGETS},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    diffusers_logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    bench = Benchmark(args)
    bench.warm_up()
    bench.npi_rows([mode for mode in args.modes if mode not in COMPILE_MODES])
    if not args.no_peers:
        bench.peer_rows()
    if not args.no_nti:
        bench.nti_rows()
    # last: compilations are the longest rows and the first the budget cuts (on a CPU they run eagerly)
    bench.npi_rows([mode for mode in args.modes if mode in COMPILE_MODES])
    return bench.finish()


if __name__ == "__main__":
    sys.exit(main())
