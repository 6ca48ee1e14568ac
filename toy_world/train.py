"""Train the toy-world text-to-image model: a tiny Stable Diffusion, from scratch.

What: a standard ``StableDiffusionPipeline`` folder (v1: VAE 64 px -> 4x16x16 latents,
UNet2DConditionModel with cross-attention at 16/8/4 px in encoder and decoder, a
3-layer CLIP text encoder, the one-token-per-word tokenizer, a DDIM scheduler with
SD's scaled-linear betas), trained on procedurally rendered toy-world scenes so
that real-image editing methods can be tested against exact ground truth.

How (everything is bounded by ``--minutes`` of wall clock, process start included,
keeping a reserve of min(30 s, 15%) for saving):

1. stage 1 (``--vae-fraction`` of the training time) trains the AutoencoderKL on
   L2 + L1 + image-gradient L1 + 1e-6 KL, then sets ``scaling_factor`` to 1/std of
   the latent means of freshly rendered scenes and measures held-out PSNR;
2. stage 2 freezes the VAE, encodes ``latent_dist.mean * scaling_factor`` (the
   mean, not a sample: with the tiny KL weight the posterior std is negligible and
   inversion code typically encodes with the mean) and trains UNet + text encoder
   jointly with epsilon-prediction MSE at DDPM noise levels from the scheduler's
   ``alphas_cumprod``, 10% caption dropout to the ids of ``""`` (exactly the
   pipeline's unconditional prompt), AdamW with warm-up and cosine decay over the
   time budget, bf16 autocast on CUDA, EMA weights (UNet and text encoder), and a
   fresh batch rendered on the device every step (``scenes.render_batch``; with
   ``--latent-reuse R`` each encoded batch is trained on R times, reshuffled).

The saved weights are the EMA weights in fp16 (the folder must stay < 22 MB for v1, < 40 MB for v2);
``StableDiffusionPipeline.from_pretrained(DIR, torch_dtype=torch.float32)`` loads
them for CPU use. A full pipeline folder is also written every
``--checkpoint-minutes`` (atomically: via ``DIR.partial``), so a killed run still
leaves a usable model. ``DIR/training_log.json`` records the command, seed, device,
per-stage wall-clock seconds, steps, final losses, VAE PSNR on a held-out seeded set
and, when time allows, the judge accuracy of samples (``DIR/samples.png``).

Retrain (one H100, ~9 minutes in total)::

    python -m toy_world.train --out toy_sd --minutes 8.5 --seed 0 --device cuda

Continue training an existing folder written by this script (e.g. the committed
``toy_world/model_v2``, with ``--world v2``) with ``--resume DIR``: ``unet/``, ``text_encoder/`` and ``vae/``
are loaded from DIR (fp16 on disk, trained in fp32), stage 1 is skipped (the VAE
stays frozen as loaded, ``scaling_factor`` included) and the whole budget goes to
stage 2 from the loaded weights: EMA initialised from them (at full decay, or at
the previous step count's decay ramp when DIR's log gives it), a short warm-up
(``--warmup-steps``, default 50 when resuming) then cosine decay from ``--lr``.
No optimizer state is stored, so AdamW starts afresh. The tokenizer is copied
from ``DIR/tokenizer`` unchanged. ``training_log.json`` gets a ``resume`` entry
(source folder; with ``DIR/training_log.json`` also the previous UNet steps and
seconds, and cumulative UNet steps and device (GPU) seconds of all runs)::

    python -m toy_world.train --out toy_sd2 --resume toy_sd --minutes 8.5 --seed 1 --device cuda

Toy world v2 (``--world v2``, ``toy_world/model_v2``): the same scenes rendered at 128 px, a factor-4 VAE
(32 x 32 latents, objects 7-11 latent cells across), a UNet with SD 1.5's four levels and block types
(cross-attention at 32, 16 and 8) and a 4-layer, 192-wide text encoder; the VAE starts from v1's (it is fully
convolutional) and is fine-tuned at 128 px (``--vae-from DIR --vae-finetune``; the v1 folder the committed v2 started
from, ``toy_world/model``, was deleted after commit f42a7f5: ``git checkout f42a7f5 -- toy_world/model``)::

    python -m toy_world.train --world v2 --vae-from toy_world/model --vae-finetune --vae-lr 3e-4 \
        --vae-fraction 0.12 --vae-batch-size 256 --out toy_world/model_v2 --minutes 8.6 --seed 0 \
        --device cuda --batch-size 512 --lr 4e-4
    python -m toy_world.train --world v2 --resume toy_world/model_v2 --out toy_world/model_v2 \
        --minutes 8.6 --seed 1 --device cuda --batch-size 512 --lr 3e-4

Token grounding (``--grounding-weight W``, ``toy_world.grounding``): adds W times TokenCompose's token loss, the
squared share of each object word's cross-attention outside its object (and of the background's colour word outside
the background), averaged over every cross-attention layer, so that word maps localise as prompt-to-prompt needs.
The logged ``loss`` stays the denoising loss alone; the token loss is logged beside it::

    python -m toy_world.train --world v2 --resume toy_world/model_v2 --out toy_world/model_v2 --minutes 9.3 \
        --seed 7 --device cuda --batch-size 512 --lr 3e-4 --checkpoint-minutes 1.5 --compile --channels-last \
        --latent-reuse 2 --grounding-weight 0.1

Offset noise (``--offset-noise S``, Guttenberg 2023) adds a per-channel constant of std S to the training noise. A
fine-tune with S = 0.1 freed background colour edits but cost colour edits, one with 0.05 gained nothing overall;
the embedded model does not use it (``benchmarks/results/README.md``, History).

TokenCompose's pixel loss (``--pixel-grounding-weight W``, ``toy_world.grounding.pixel_loss``) adds W times the
cross-entropy of each grounded word's attention against its whole region. A fine-tune with W = 0.005 made the
background's colour word cover the background but cost pattern edits and unedited PSNR; the embedded model does not
use it (``benchmarks/results/README.md``, History).

Micro check on CPU (~30 s, writes a loadable but untrained folder; add ``--world v2`` for v2)::

    python -m toy_world.train --out /tmp/toy_micro --minutes 0.3 --device cpu --batch-size 8

Runs are seeded (model init, data, noise), but because training stops on wall
clock the step count, and hence the weights, depends on the machine; pass
``--max-steps``/``--max-vae-steps`` for step-exact runs.
"""

from __future__ import annotations

import time


_T0 = time.time()  # the --minutes budget counts from process start

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from . import judge, scenes, tokenizer  # noqa: E402
from .grounding import GroundingAttnProcessor  # noqa: E402


TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 160),
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(2, 4, 5),  # diffusers' legacy name for *heads* per level: 32-dim heads
    cross_attention_dim=TEXT_CONFIG["hidden_size"],
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    sample_size=64,
    layers_per_block=1,
    block_out_channels=(48, 96, 96),  # 3 levels = 2 downsamples: 64 px -> 16x16
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,  # 4-8 channels per group: fitted faster than per-channel norm in CPU trials
)
# Toy world v2: SD-like geometry. The same scenes rendered at 128 px, a factor-4 VAE
# (32 x 32 latents; objects span 7-11 latent cells), and a UNet with SD 1.5's four
# levels and block types: cross-attention at 32, 16 and 8 (encoder and decoder), a
# plain ResNet level at 4. Sized so the fp16 folder stays under 40 MB.
TEXT_CONFIG_V2 = dict(
    hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77
)
UNET_CONFIG_V2 = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 192, 192),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(2, 4, 6, 6),  # heads per level: 32-dim heads
    cross_attention_dim=TEXT_CONFIG_V2["hidden_size"],
    norm_num_groups=32,
)
VAE_CONFIG_V2 = dict(VAE_CONFIG, sample_size=scenes.RES_V2)  # same factor-4 VAE, fine-tuned at 128 px
WORLDS = {
    "v1": dict(res=scenes.H, unet=UNET_CONFIG, vae=VAE_CONFIG, text=TEXT_CONFIG),
    "v2": dict(res=scenes.RES_V2, unet=UNET_CONFIG_V2, vae=VAE_CONFIG_V2, text=TEXT_CONFIG_V2),
}
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
VAE_EVAL_SEED, SAMPLE_EVAL_SEED = 1_000_003, 2_000_003  # fixed: comparable across runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output pipeline folder (replaced)")
    p.add_argument(
        "--world",
        choices=sorted(WORLDS),
        default="v1",
        help="v1: 64 px, 16x16 latents; v2: 128 px, 32x32 latents, SD's four UNet levels (toy_world/model_v2)",
    )
    p.add_argument("--minutes", type=float, default=8.5, help="total wall-clock budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--vae-fraction", type=float, default=0.2, help="share of training time for the VAE")
    p.add_argument("--vae-batch-size", type=int, default=None, help="default: half of --batch-size")
    p.add_argument(
        "--vae-target-psnr",
        type=float,
        default=None,
        help="end stage 1 early once the running training PSNR (dB) exceeds this",
    )
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=3e-4, help="UNet + text encoder peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 200, or 50 with --resume")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--min-snr-gamma", type=float, default=0.0, help="Min-SNR loss weighting (0 = plain MSE)")
    p.add_argument(
        "--offset-noise",
        type=float,
        default=0.0,
        help="std of a per-channel constant added to the training noise (Guttenberg 2023), so the noisy "
        "latent's mean stops telling the UNet the image's overall colour (0 = off)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="also stop stage 2 after this many steps")
    p.add_argument("--max-vae-steps", type=int, default=None, help="also stop stage 1 after this many steps")
    p.add_argument("--vae-from", default=None, help="reuse the VAE of this pipeline folder, skip stage 1")
    p.add_argument(
        "--vae-finetune",
        action="store_true",
        help="with --vae-from: run stage 1 on the loaded VAE instead of skipping it (e.g. the v1 "
        "VAE fine-tuned on v2's 128 px renders; it is fully convolutional)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue stage 2 from the UNet, text encoder and (frozen) VAE of a folder written "
        "by this script; skips stage 1",
    )
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--log-seconds", type=float, default=10.0)
    p.add_argument("--render-chunk", type=int, default=4, help="batches rendered per render_batch call")
    p.add_argument(
        "--latent-reuse",
        type=int,
        default=1,
        help="stage 2: train on each encoded scene this many times (fresh noise each time; saves VAE work)",
    )
    p.add_argument("--eval-samples", type=int, default=64, help="judge this many samples at the end if time allows")
    p.add_argument(
        "--vae-eval-images",
        type=int,
        default=None,
        help="held-out images for PSNR (2x for the latent std); default 256 on CUDA, 16 on CPU",
    )
    p.add_argument(
        "--grounding-weight",
        type=float,
        default=0.0,
        help="weight of the token-grounding loss (toy_world.grounding: each object word's cross-attention "
        "inside its object; 0 = off)",
    )
    p.add_argument(
        "--pixel-grounding-weight",
        type=float,
        default=0.0,
        help="weight of TokenCompose's pixel loss (toy_world.grounding.pixel_loss: each grounded word's "
        "attention over the whole of its region; 0 = off)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    if args.resume and args.vae_from:
        p.error("--resume and --vae-from are exclusive (--resume already loads DIR/vae)")
    if args.vae_finetune and not args.vae_from:
        p.error("--vae-finetune needs --vae-from")
    for name in ("grounding_weight", "pixel_grounding_weight"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.offset_noise < 0:
        p.error(f"--offset-noise must be at least 0, got {args.offset_noise}")
    if args.latent_reuse < 1:
        p.error(f"--latent-reuse must be at least 1, got {args.latent_reuse}")
    if args.warmup_steps is None:
        args.warmup_steps = 50 if args.resume else 200
    return args


def log(msg: str):
    print(f"[{time.time() - _T0:7.1f}s] {msg}", flush=True)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


class Batches:
    """Training data rendered on the device: (images, token ids), with ``region_size`` also each word's region
    (``scenes.scene_regions`` area-pooled to ``region_size``², ``scenes.spec_token_slots``) for token grounding.
    Rendering costs a fixed number of kernel launches per call, so several batches are rendered at once and handed
    out."""

    def __init__(self, batch: int, device, generator, chunk: int, res: int, region_size: int | None = None):
        self.batch, self.device, self.g, self.chunk, self.queue, self.res = batch, device, generator, chunk, [], res
        self.region_size = region_size

    def next(self):
        if not self.queue:
            rendered = scenes.render_batch(
                self.batch * self.chunk, self.g, self.device, res=self.res, return_regions=self.region_size is not None
            )
            if self.region_size is not None:
                images, ids, regions, slots = rendered
                rendered = (images, ids, F.adaptive_avg_pool2d(regions, self.region_size), slots)
            self.queue = list(zip(*(part.split(self.batch) for part in rendered)))
        return self.queue.pop()


class EncodedBatches:
    """Stage-2 data: rendered scenes encoded once by the frozen VAE, each latent then used in ``reuse`` passes (fresh
    noise, timestep and caption dropout every time). At 128 px the encoding costs a quarter of a UNet + text-encoder
    step's arithmetic (3.9 of 12.1 GFLOP per scene, v2). Pass 0 keeps the rendered order; later passes reshuffle the
    chunk, so no batch repeats. Each latent travels with the rest of its scene's batch entry (token ids, and with
    grounding its regions and token slots)."""

    def __init__(self, scenes: Batches, encode, reuse: int):
        self.scenes, self.encode, self.reuse, self.queue = scenes, encode, reuse, []

    def next(self):
        if not self.queue:
            rendered = [self.scenes.next() for _ in range(self.scenes.chunk)]
            latents = torch.cat([self.encode(images) for images, *_ in rendered])
            parts = [latents] + [torch.cat(part) for part in list(zip(*rendered))[1:]]  # ids[, regions, slots]
            for index in range(self.reuse):
                order = (
                    torch.arange(len(latents), device=latents.device)
                    if index == 0
                    else torch.randperm(len(latents), device=latents.device, generator=self.scenes.g)
                )
                self.queue += list(zip(*(part[order].split(self.scenes.batch) for part in parts)))
            self.queue.reverse()  # pop() hands them out in order
        return self.queue.pop()


class EMA:
    """Exponential moving average of parameters (fp32 shadow copies)."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int):  # resumed runs pass an offset step (see main)
        d = min(self.decay, (1 + step) / (10 + step))  # short memory early on
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    def copies(self, modules):
        """Deep copies of ``modules`` carrying the EMA weights."""
        out = [copy.deepcopy(m) for m in modules]
        with torch.no_grad():
            for p, s in zip([p for m in out for p in m.parameters()], self.shadow):
                p.copy_(s)
        return out


def training_noise(z: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``z``, plus (offset noise, Guttenberg 2023) one constant of std ``offset`` per sample and
    channel."""
    noise = torch.randn_like(z)
    return noise + offset * torch.randn_like(z[:, :, :1, :1]) if offset else noise


def lr_factor(step: int, frac: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay over the (time) fraction of the stage."""
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def vae_psnr(vae, device, n: int, res: int) -> float:
    """Mean per-image PSNR (dB, [0,1] range) of mean-latent reconstructions of a fixed
    held-out set of scenes."""
    imgs, _ = scenes.render_batch(n, torch.Generator(device).manual_seed(VAE_EVAL_SEED), device, res=res)
    psnr = []
    for x in imgs.split(64):
        with autocast(device):
            rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample.float()
        mse = ((rec / 2 + 0.5).clamp(0, 1) - x).pow(2).mean(dim=(1, 2, 3))
        psnr.append(-10 * torch.log10(mse.clamp(min=1e-10)))
    return torch.cat(psnr).mean().item()


@torch.no_grad()
def encode_scenes(vae, images: torch.Tensor, device) -> torch.Tensor:
    """Unscaled latent means of [0, 1] scene images, in the training autocast."""
    with autocast(device):
        return vae.encode(images * 2 - 1).latent_dist.mean.float()


def latent_std(vae, device, n: int, res: int) -> float:
    imgs, _ = scenes.render_batch(n, torch.Generator(device).manual_seed(VAE_EVAL_SEED + 1), device, res=res)
    return torch.cat([encode_scenes(vae, x, device) for x in imgs.split(128)]).std().item()


def psnr(mse_pm1: float) -> float:
    """PSNR in dB on the [0, 1] scale from an MSE measured on the [-1, 1] scale."""
    return 10 * math.log10(4.0 / max(mse_pm1, 1e-12))


def init_vae(vae):
    """Start the posterior std small (logvar -8): from the default logvar ~0 the
    sampled latents are mostly noise and reconstruction stalls until the encoder
    learns to shrink it. (KL weight 1e-6 barely pulls it back.)"""
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    return vae


def train_vae(vae, args, device, deadline: float) -> dict:
    data = Batches(
        args.vae_batch_size or max(1, args.batch_size // 2),
        device,
        torch.Generator(device).manual_seed(args.seed * 2 + 1),
        args.render_chunk,
        WORLDS[args.world]["res"],
    )
    opt = torch.optim.AdamW(
        vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda"
    )
    start = time.time()
    step, recent, last_log = 0, [], start
    vae.train()
    while time.time() < deadline and (args.max_vae_steps is None or step < args.max_vae_steps):
        x = data.next()[0] * 2 - 1
        with autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        l2 = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        # Edges and texture grain carry little energy; an image-gradient L1 term keeps
        # them sharp without a perceptual network.
        grad = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
        kl = post.kl().float().mean()
        loss = l2 + l1 + 0.5 * grad + 1e-6 * kl
        frac = (time.time() - start) / max(1e-6, deadline - start)
        if args.max_vae_steps:
            frac = max(frac, step / args.max_vae_steps)
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_factor(step, frac, warmup=100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        recent = (recent + [(l2.item(), l1.item(), kl.item())])[-50:] if step % 10 == 0 or step < 50 else recent
        if time.time() - last_log > args.log_seconds:
            last_log = time.time()
            m = [sum(v) / len(v) for v in zip(*recent)]
            log(
                f"vae step {step} {step / (last_log - start):.2f} it/s mse {m[0]:.5f} (~{psnr(m[0]):.1f} dB) "
                f"l1 {m[1]:.4f} kl {m[2]:.1f}"
            )
            if args.vae_target_psnr and psnr(m[0]) > args.vae_target_psnr:
                break
    vae.eval().requires_grad_(False)
    m = [sum(v) / len(v) for v in zip(*recent)] if recent else [float("nan")] * 3
    return dict(seconds=time.time() - start, steps=step, final_mse=m[0], final_l1=m[1], final_kl=m[2])


def export(out: str, vae, unet, text_encoder, tok, record: dict, tokenizer_from: str | None = None):
    """Write the fp16 pipeline folder atomically (build in OUT.partial, then swap).
    ``tokenizer_from``: copy this tokenizer folder verbatim instead of writing ours."""
    out = out.rstrip("/")
    tmp, old = out + ".partial", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)

    def half(m):
        m = copy.deepcopy(m).to("cpu")
        for p in m.parameters():  # not .to(dtype): diffusers warns about fp32-only modules (we have none)
            p.data = p.data.half()
        return m

    pipe = StableDiffusionPipeline(
        vae=half(vae),
        text_encoder=half(text_encoder),
        tokenizer=tok,
        unet=half(unet),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    if tokenizer_from:
        shutil.rmtree(os.path.join(tmp, "tokenizer"))
        shutil.copytree(tokenizer_from, os.path.join(tmp, "tokenizer"))
    else:
        tokenizer.save_tokenizer(os.path.join(tmp, "tokenizer"))  # adds vocab.json / merges.txt
    # transformers 5 loads a model in its config "dtype" by default while diffusers
    # loads fp32: declare the text encoder fp32 so that a plain from_pretrained(DIR)
    # gives a consistent fp32 pipeline (weights stay fp16 on disk).
    cfg_path = os.path.join(tmp, "text_encoder", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump(dict(cfg, dtype="float32"), f, indent=2)
    write_record(tmp, record)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_record(folder: str, record: dict):
    record = dict(record, total_seconds=time.time() - _T0)
    res = record.get("resume") or {}
    if "previous_cumulative_device_seconds" in res:  # whole-process seconds of the chain, this run included
        record["resume"] = dict(
            res, cumulative_device_seconds=res["previous_cumulative_device_seconds"] + record["total_seconds"]
        )
    with open(os.path.join(folder, "training_log.json"), "w") as f:
        json.dump(record, f, indent=2)


def add_cumulative(record: dict):
    """Cumulative UNet steps/seconds over the resumed chain, this run included."""
    res = record.get("resume") or {}
    if "previous_cumulative_unet_steps" in res:
        res["cumulative_unet_steps"] = res["previous_cumulative_unet_steps"] + record["unet"]["steps"]
        res["cumulative_unet_seconds"] = res["previous_cumulative_unet_seconds"] + record["unet"]["seconds"]


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


@torch.no_grad()
def sample_eval(out: str, vae, unet, text_encoder, tok, device, n: int, res: int) -> dict:
    """Generate ``n`` seeded captions (CFG 5, 25 DDIM steps) and judge them (the judge
    is calibrated on 64 px renders: larger samples are area-downsampled to 64 px,
    which is how a 64 px render relates to a larger one)."""
    _, _, captions = scenes.render_batch(
        n, torch.Generator().manual_seed(SAMPLE_EVAL_SEED), "cpu", return_captions=True
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    with autocast(device):
        images = (
            pipe(
                captions,
                num_inference_steps=25,
                guidance_scale=5.0,
                output_type="pt",
                generator=torch.Generator(device).manual_seed(SAMPLE_EVAL_SEED),
            )
            .images.float()
            .cpu()
        )
    small = F.interpolate(images, size=(scenes.H, scenes.W), mode="area") if res != scenes.H else images
    scores = judge.evaluate(small, captions)
    k = min(16, n)
    grid = images[:k].reshape(-1, min(k, 8), 3, res, res).permute(0, 3, 1, 4, 2).reshape(-1, min(k, 8) * res, 3)
    from PIL import Image

    Image.fromarray((grid * 255).round().byte().numpy()).save(os.path.join(out, "samples.png"))
    verdicts = scores.pop("verdicts")
    return dict(n=n, **scores, captions=captions[:k], ok=[v.ok for v in verdicts[:k]])


def load_resume(folder: str, device):
    """Models (fp32), tokenizer (a verbatim copy in a temp folder) and resume record
    of a pipeline folder written by this script."""
    from transformers import CLIPTokenizer

    for sub in ("model_index.json", "unet", "text_encoder", "vae", "tokenizer"):
        if not os.path.exists(os.path.join(folder, sub)):
            sys.exit(f"--resume {folder}: no {sub} (not a folder written by toy_world.train)")
    tok_dir = os.path.join(tempfile.mkdtemp(prefix="toy_tokenizer_"), "tokenizer")
    shutil.copytree(os.path.join(folder, "tokenizer"), tok_dir)  # copied now: --out may equal DIR
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    bos, eos = tokenizer.special_ids()
    for w, i in tokenizer.word_ids().items():  # training ids come from scenes.tokenize
        if tok(w).input_ids != [bos, i, eos]:
            sys.exit(f"--resume {folder}: its tokenizer does not match toy_world.tokenizer ({w!r})")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32)
    info = dict(folder=folder, abspath=os.path.abspath(folder), previous_log=None)
    log_path = os.path.join(folder, "training_log.json")
    if os.path.exists(log_path):
        with open(log_path) as f:
            prev = json.load(f)
        prev_res = prev.get("resume") or {}
        steps = (prev.get("unet") or {}).get("steps")
        if steps is not None:
            info.update(
                previous_log=log_path,
                previous_status=prev.get("status"),
                previous_device_name=prev.get("device_name"),
                previous_unet_steps=steps,
                previous_unet_seconds=prev["unet"].get("seconds", 0.0),
                previous_total_seconds=prev.get("total_seconds", 0.0),
            )
            # a resumed folder carries its own chain totals
            info.update(
                previous_cumulative_unet_steps=prev_res.get("cumulative_unet_steps", steps),
                previous_cumulative_unet_seconds=prev_res.get(
                    "cumulative_unet_seconds", info["previous_unet_seconds"]
                ),
                previous_cumulative_device_seconds=prev_res.get(
                    "cumulative_device_seconds", info["previous_total_seconds"]
                ),
            )
    return unet.to(device), text_encoder.to(device), vae.to(device), tok, tok_dir, info


def main(argv=None):
    args = parse_args(argv)
    world = WORLDS[args.world]
    device = torch.device(args.device)
    budget = args.minutes * 60
    hard_deadline = _T0 + budget
    train_end = hard_deadline - min(30.0, 0.15 * budget)
    if (
        os.path.isdir(args.out)
        and os.listdir(args.out)
        and not os.path.exists(os.path.join(args.out, "model_index.json"))
    ):
        sys.exit(f"refusing to replace {args.out}: not empty and not a pipeline folder")
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")

    tok_from, resume = None, None
    if args.resume:
        unet, text_encoder, vae, tok, tok_from, resume = load_resume(args.resume, device)
        if unet.config.sample_size != world["unet"]["sample_size"]:
            sys.exit(f"--resume {args.resume}: a {unet.config.sample_size}^2-latent UNet is not --world {args.world}")
    else:
        tok = tokenizer.save_tokenizer(tempfile.mkdtemp(prefix="toy_tokenizer_"))
        bos, eos = tokenizer.special_ids()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tok), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **world["text"])
        ).to(device)
        unet = UNet2DConditionModel(**world["unet"]).to(device)
        vae = (
            AutoencoderKL.from_pretrained(os.path.join(args.vae_from, "vae"), torch_dtype=torch.float32)
            if args.vae_from
            else init_vae(AutoencoderKL(**world["vae"]))
        ).to(device)
        if args.vae_from:
            vae.register_to_config(sample_size=world["res"])  # the size pipelines default to
    counts = dict(unet=n_params(unet), vae=n_params(vae), text_encoder=n_params(text_encoder))
    log(f"device {device} ({device_name}); parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    record = dict(
        command=" ".join([sys.executable, "-m", "toy_world.train"] + sys.argv[1:]),
        args=vars(args),
        seed=args.seed,
        device=str(device),
        device_name=device_name,
        parameters=counts,
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__),
        world=args.world,
        resolution=world["res"],
        unet_config=world["unet"],
        vae_config=world["vae"],
        text_config=world["text"],
        status="running",
    )
    if resume:
        # The EMA starts at the loaded (EMA) weights; its decay ramp continues from the
        # previous step count, or is at full decay when that is unknown.
        ema_offset = resume.get("previous_cumulative_unet_steps", 10**9)
        record["resume"] = dict(resume, ema_step_offset=ema_offset)
        log(
            f"resuming from {args.resume}: "
            + (
                f"{resume['previous_cumulative_unet_steps']} UNet steps so far"
                if resume["previous_log"]
                else "no training_log.json"
            )
        )

    # ---- stage 1: VAE
    n_eval = args.vae_eval_images or (256 if device.type == "cuda" else 16)
    res = world["res"]
    if args.resume or (args.vae_from and not args.vae_finetune):
        vae.eval().requires_grad_(False)
        record["vae"] = dict(seconds=0.0, steps=0, loaded_from=args.vae_from or args.resume)
    else:
        if args.vae_from:
            log(f"vae loaded from {args.vae_from}: {vae_psnr(vae, device, n_eval, res):.2f} dB before fine-tuning")
        now = time.time()
        record["vae"] = train_vae(vae, args, device, now + args.vae_fraction * (train_end - now))
        if args.vae_from:
            record["vae"]["finetuned_from"] = args.vae_from
        vae.register_to_config(scaling_factor=1.0 / latent_std(vae, device, 2 * n_eval, res))
    record["vae"].update(psnr_db=vae_psnr(vae, device, n_eval, res), scaling_factor=vae.config.scaling_factor)
    log(f"vae done: {record['vae']}")
    sf = vae.config.scaling_factor

    # ---- stage 2: UNet + text encoder
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    pixel_grounded = args.pixel_grounding_weight > 0
    grounded = args.grounding_weight > 0 or pixel_grounded
    if grounded:
        unet.set_attn_processor(GroundingAttnProcessor())
    unet_fwd = torch.compile(unet) if args.compile else unet
    unet.train(), text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    ema = EMA([unet, text_encoder], args.ema_decay)
    alphas = DDIMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.to(device)
    empty_ids = scenes.tokenize([""]).to(device)
    scenes_for_unet = Batches(
        args.batch_size,
        device,
        torch.Generator(device).manual_seed(args.seed * 2 + 2),
        args.render_chunk,
        res,
        region_size=unet.config.sample_size if grounded else None,
    )
    data = EncodedBatches(scenes_for_unet, lambda images: encode_scenes(vae, images, device) * sf, args.latent_reuse)
    start = last_log = last_ckpt = time.time()
    step, recent, recent_grounding, recent_pixel = 0, [], [], []
    while time.time() < train_end and (args.max_steps is None or step < args.max_steps):
        z, ids, *regions_and_slots = data.next()
        b = z.shape[0]
        drop = torch.rand(b, device=device) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_ids, ids)
        attention_kwargs = None
        if grounded:  # a dropped caption grounds no token
            regions, slots = regions_and_slots
            grounding = dict(regions=regions, slots=torch.where(drop[:, None], -1, slots), losses=[])
            if pixel_grounded:
                grounding["pixel_losses"] = []
            attention_kwargs = dict(grounding=grounding)
        t = torch.randint(0, len(alphas), (b,), device=device)
        noise = training_noise(z, args.offset_noise)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        if args.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            pred = unet_fwd(noisy, t, text_encoder(ids)[0], cross_attention_kwargs=attention_kwargs).sample.float()
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if args.min_snr_gamma > 0:
            snr = a.flatten() / (1 - a.flatten())
            per_sample = per_sample * snr.clamp(max=args.min_snr_gamma) / snr
        denoising_loss = loss = per_sample.mean()
        if grounded:
            grounding_loss = torch.stack(grounding["losses"]).mean()
            loss = denoising_loss + args.grounding_weight * grounding_loss
            if pixel_grounded:
                pixel_grounding_loss = torch.stack(grounding["pixel_losses"]).mean()
                loss = loss + args.pixel_grounding_weight * pixel_grounding_loss
        frac = (time.time() - start) / max(1e-6, train_end - start)
        if args.max_steps:
            frac = max(frac, step / args.max_steps)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, frac, args.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step + ema_offset if resume else step)
        step += 1
        if step % 10 == 0 or step < 50:
            recent = (recent + [denoising_loss.item()])[-50:]  # comparable with and without grounding
            if grounded:
                recent_grounding = (recent_grounding + [grounding_loss.item()])[-50:]
            if pixel_grounded:
                recent_pixel = (recent_pixel + [pixel_grounding_loss.item()])[-50:]
        now = time.time()
        if now - last_log > args.log_seconds:
            last_log = now
            log(
                f"unet step {step} {step / (now - start):.2f} it/s loss {sum(recent) / len(recent):.4f} "
                + (f"(token grounding {sum(recent_grounding) / len(recent_grounding):.4f}) " if grounded else "")
                + (f"(pixel grounding {sum(recent_pixel) / len(recent_pixel):.4f}) " if recent_pixel else "")
                + f"lr {opt.param_groups[0]['lr']:.2e}"
            )
        if now - last_ckpt > args.checkpoint_minutes * 60 and train_end - now > 20:
            last_ckpt = now
            record["unet"] = dict(seconds=now - start, steps=step, final_loss=sum(recent) / len(recent))
            add_cumulative(record)
            export(
                args.out,
                vae,
                *ema.copies([unet, text_encoder]),
                tok,
                dict(record, status="checkpoint"),
                tokenizer_from=tok_from,
            )
            log(f"checkpoint written to {args.out}")

    seconds = time.time() - start
    record["unet"] = dict(
        seconds=seconds,
        steps=step,
        steps_per_s=step / max(seconds, 1e-9),
        final_loss=sum(recent) / len(recent) if recent else float("nan"),
        batch_size=args.batch_size,
    )
    if grounded:
        record["unet"]["final_grounding_loss"] = (
            sum(recent_grounding) / len(recent_grounding) if recent_grounding else float("nan")
        )
    if recent_pixel:
        record["unet"]["final_pixel_grounding_loss"] = sum(recent_pixel) / len(recent_pixel)
    record["status"] = "final"
    add_cumulative(record)
    ema_unet, ema_text = ema.copies([unet, text_encoder])
    ema_unet.eval(), ema_text.eval()
    export(args.out, vae, ema_unet, ema_text, tok, record, tokenizer_from=tok_from)
    log(f"saved {args.out} ({folder_bytes(args.out) / 1e6:.2f} MB); unet {record['unet']}")
    if args.eval_samples > 0 and hard_deadline - time.time() > 15:
        record["sample_eval"] = sample_eval(args.out, vae, ema_unet, ema_text, tok, device, args.eval_samples, res)
        log(
            f"sample eval: {record['sample_eval']['scene_accuracy']:.3f} scenes, "
            f"{record['sample_eval']['object_accuracy']:.3f} objects judged correct"
        )
    record["folder_bytes"] = folder_bytes(args.out)
    write_record(args.out, record)
    log(f"done: {args.out} is {record['folder_bytes'] / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
