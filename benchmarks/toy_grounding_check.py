"""Held-out denoising loss and token-grounding loss of toy-world models: what token grounding buys and costs.

Both losses on the same fixed scenes, noise and timesteps for every model (stratified over the 1000 training
timesteps), so models trained with different ``--grounding-weight`` compare directly (CPU: about a minute per model
for 256 scenes)::

    python benchmarks/toy_grounding_check.py toy_world/model_v2 /tmp/grounded --scenes 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from toy_world import scenes
from toy_world.grounding import GroundingAttnProcessor
from toy_world.train import SCHEDULER_CONFIG, encode_scenes


ROOT = Path(__file__).resolve().parents[1]


SEED = 4_000_003  # not a training or evaluation seed of toy_world.train


@torch.no_grad()
def check(folder: str, count: int, batch: int, res: int) -> dict:
    unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet", torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(f"{folder}/text_encoder", dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(f"{folder}/vae", torch_dtype=torch.float32).eval()
    unet.set_attn_processor(GroundingAttnProcessor())
    alphas = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod
    g = torch.Generator().manual_seed(SEED)
    images, ids, regions, slots = scenes.render_batch(count, g, res=res, return_regions=True)
    regions = F.adaptive_avg_pool2d(regions, unet.config.sample_size)
    timesteps = (torch.arange(count) * len(alphas) // count).flip(0)
    denoising, grounding = [], []
    for k in range(0, count, batch):
        part = slice(k, k + batch)
        z = encode_scenes(vae, images[part], torch.device("cpu")) * vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=g)
        a = alphas[timesteps[part]].view(-1, 1, 1, 1)
        state = dict(regions=regions[part], slots=slots[part], losses=[])
        pred = unet(
            a.sqrt() * z + (1 - a).sqrt() * noise,
            timesteps[part],
            text_encoder(ids[part])[0],
            cross_attention_kwargs=dict(grounding=state),
        ).sample
        denoising.append((pred - noise).pow(2).mean().item())
        grounding.append(torch.stack(state["losses"]).mean().item())
    return dict(
        model=folder, denoising_mse=sum(denoising) / len(denoising), token_loss=sum(grounding) / len(grounding)
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="pipeline folders written by toy_world.train")
    p.add_argument("--scenes", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--res", type=int, default=scenes.RES_V2)
    args = p.parse_args(argv)
    print("| model | held-out ε-MSE | token loss |\n|---|---:|---:|")
    for folder in args.models:
        r = check(folder, args.scenes, args.batch_size, args.res)
        print(f"| `{r['model']}` | {r['denoising_mse']:.4f} | {r['token_loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
