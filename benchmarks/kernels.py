#!/usr/bin/env python
"""Kernel choices the utilisation profile points at next, each timed against the default on this machine.

    python -m benchmarks.kernels --out DIR [--model sd15|sdxl] [--batches 1 3 16 48] [--quick]

- Fused attention backends (``torch.nn.attention.sdpa_kernel``: flash, memory-efficient, cuDNN) against PyTorch's
  default choice, at every attention shape of one UNet forward (recorded from the model, per sample) and the given
  batch sizes: seconds of one UNet call's attention; "—" where a backend rejects a shape.
- The VAE decoder in contiguous (NCHW) against channels-last memory layout.

Random weights, as ``speed.py``. Writes DIR/kernels.json and DIR/kernels.md (printed last).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.speed import MODELS, TINY_MODELS, build_components, log  # speed.py sets offline env defaults first
from benchmarks.utilisation import AttentionTimes, time_median, unet_work
from negative_prompt_inversion.pipeline_negative_prompt_inversion import NegativePromptInversionPipeline


def attention_backends(attention: AttentionTimes, batches: list[int]) -> list[dict]:
    """Seconds of one UNet call's attention per backend and batch size (None: the backend rejects a shape)."""
    from torch.nn.attention import SDPBackend

    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    if attention.device.type != "cuda":
        backends = {"default": None}
    return [
        {"batch": batch, **{name: attention.per_call(batch, backend) for name, backend in backends.items()}}
        for batch in batches
    ]


@torch.no_grad()
def vae_decode_layouts(pipe, batch: int, size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds of one VAE decode of ``batch`` latents, contiguous against channels-last."""
    vae = pipe.vae
    latent = size // pipe.vae_scale_factor
    latents = torch.randn(batch, vae.config.latent_channels, latent, latent, device=device, dtype=dtype)
    result = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        vae.to(memory_format=layout)
        result[str(layout).split(".")[-1]] = time_median(
            lambda layout=layout: vae.decode(latents.to(memory_format=layout), return_dict=False),
            device,
            repeats=5,
            warmup=2,
        )
    vae.to(memory_format=torch.contiguous_format)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Kernel choices: attention backends and the VAE decoder layout.")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="sd15 (default; tiny with --quick)")
    parser.add_argument("--size", type=int, default=None, help="512 (SDXL 1024; --quick 64)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="UNet batch sizes (samples per call) to time attention at (1 3 16 48; --quick 1 3)",
    )
    parser.add_argument("--vae-batch", type=int, default=None, help="images per VAE decode (16; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, 64 px")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = args.model or (TINY_MODELS["sd15"] if args.quick else "sd15")
    size = args.size or (64 if args.quick else 1024 if model == "sdxl" else 512)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batches = args.batches or ([1, 3] if args.quick else [1, 3, 16, 48])
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = NegativePromptInversionPipeline(
        **build_components(model, device, dtype, Path(tempfile.mkdtemp())), safety_checker=None, feature_extractor=None
    )
    work = unet_work(pipe, size, device, dtype)
    attention = AttentionTimes(work["attention_calls"], device)
    result = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "model": model,
        "size": size,
        "dtype": str(dtype).split(".")[-1],
        "flops_per_sample": work["flops_per_sample"],
        "attention_calls_per_sample": len(work["attention_calls"]),
        "attention_s_per_unet_call": attention_backends(attention, batches),
        "vae_decode_s": vae_decode_layouts(pipe, args.vae_batch or (1 if args.quick else 16), size, device, dtype),
        "vae_batch": args.vae_batch or (1 if args.quick else 16),
    }
    (args.out / "kernels.json").write_text(json.dumps(result, indent=2))
    table = kernels_markdown(result)
    (args.out / "kernels.md").write_text(table)
    log("wrote " + str(args.out / "kernels.json"))
    print(table)
    return 0


def kernels_markdown(result: dict) -> str:
    rows = result["attention_s_per_unet_call"]
    names = [name for name in rows[0] if name != "batch"]
    lines = [
        f"## Kernel choices on {result['device_name']} ({result['model']}, {result['size']} px, {result['dtype']})",
        "",
        f"Fused attention of one UNet call ({result['attention_calls_per_sample']} attention calls), ms, "
        "each shape timed alone (median of 5):",
        "",
        "| samples per call | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for row in rows:
        cells = ["—" if row[name] is None else f"{row[name] * 1e3:.2f}" for name in names]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    vae = result["vae_decode_s"]
    lines += [
        "",
        f"VAE decode of {result['vae_batch']} image(s): "
        + ", ".join(f"{layout} {seconds * 1e3:.1f} ms" for layout, seconds in vae.items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
