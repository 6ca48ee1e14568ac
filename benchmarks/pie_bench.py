"""PIE-Bench benchmark: every editing row of the project on any PIE-Bench folder.

The folder is the real PIE-Bench (with Stable Diffusion weights: ``--model``) or one the toy world writes
(``--write-toy N``; the default model is the embedded toy model). Metrics as PnPInversion's evaluation
(``negative_prompt_inversion.pie_bench``): background PSNR / MSE / SSIM on (1 − mask); structure distance, CLIP whole / edited
and LPIPS when their weights are on this machine (otherwise skipped, with the reason in the output); on a toy
folder also the exact ones: edit PSNR against the true edited image, unedited PSNR on the exact mask,
attribute accuracy, objects kept. Also the reconstruction PSNR of every inversion the rows use (the input
regenerated with no edit, at the benchmark's guidance), against the VAE's round trip, the ceiling of all of them.

    # toy world v2 pairs as a PIE-Bench folder, then the benchmark (GPU: ~minutes; CPU: use --limit)
    python benchmarks/pie_bench.py --write-toy 200 --res 128 --data /tmp/pie_toy \\
        --model toy_world/model_v2 --out benchmarks/results/pie_toy_v2 --device cuda
    # the real PIE-Bench, every row as its reference code runs it (comparable with published numbers)
    python benchmarks/pie_bench.py --data PIE-Bench_v1 --model PATH/TO/stable-diffusion-v1-4 --out results/pie \\
        --protocol references

Writes ``OUT/pie_bench.json`` (per-item records, means per row and per editing type, skipped metrics) and
``OUT/pie_bench.md`` (after every batch of items), and ``OUT/examples.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from negative_prompt_inversion import pie_bench as pie_format
from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    PromptToPrompt,
    ProximalGuidance,
)
from toy_world import evaluate, pie_bench


ROOT = Path(__file__).resolve().parents[1]


REWEIGHT = 2.0  # PnPInversion's P2P runs scale the target's blended word's attention by 2
# How the rows set up prompt-to-prompt and proximal guidance (`--protocol`):
# - "pipeline": the pipeline's defaults: word swap for pairs of equal word counts, refinement otherwise (P2P's own
#   choice); proximal guidance "soft" (ProxEdit's README: quantile 0.7 of each target's, inversion guidance).
# - "references": as the reference code computes them, for numbers comparable with published ones. PnPInversion's
#   `run_editing_p2p.py` refines every pair (its editor never asks for word swap), and thresholds at quantile 0.75
#   over the whole batch, whose NPI source half is all zeros: 0.5 of each target's (ALGORITHMS §4). It asks for
#   inversion guidance, but its step never applies it. ProxMasaCtrl's reference: 0.7 of the target's, no inversion
#   guidance.
PROTOCOLS = {
    "pipeline": {"edit_type": None, "proximal": "soft", "proximal_masactrl": "soft"},
    "references": {
        "edit_type": "refine",
        "proximal": ProximalGuidance("soft", quantile=0.5, inversion_guidance=False),
        "proximal_masactrl": ProximalGuidance("soft", quantile=0.7, inversion_guidance=False),
    },
}


def rows(protocol: str) -> dict:
    """row -> (inversion, edit arguments, uses blended_word: True for local blend and re-weighting, "reweight" for
    re-weighting alone). Names are the issue's;
    DI is Direct Inversion (PnP Inversion), "NPI+P2P-null" NPI+P2P with targets guided against E("") (DI without its
    pinned source)."""
    settings = PROTOCOLS[protocol]
    p2p = {"attention_control": PromptToPrompt(0.4, 0.6, edit_type=settings["edit_type"])}
    proximal = {"proximal_guidance": settings["proximal"]}
    return {
        "DDIM+CFG": ("ddim", {}, False),
        "DDIM+P2P": ("ddim", p2p, True),
        "NTI+P2P": ("nti", p2p, True),
        "NPI+P2P": ("npi", p2p, True),
        "NPI+P2P-null": ("npi", {**p2p, "target_guidance": "null"}, True),
        "DI+P2P": ("direct", p2p, True),
        "DI+P2P-noblend": ("direct", p2p, "reweight"),
        "ProxNPI": ("npi", proximal, False),
        "ProxNPI+P2P": ("npi", {**p2p, **proximal}, True),
        "DI+Prox": ("direct", proximal, False),
        "DI+Prox+P2P": ("direct", {**p2p, **proximal}, True),
        "MasaCtrl": ("npi", {"attention_control": MasaCtrl()}, False),
        "DI+MasaCtrl": ("direct", {"attention_control": MasaCtrl()}, False),
        "ProxMasaCtrl": (
            "npi",
            {"attention_control": MasaCtrl(), "proximal_guidance": settings["proximal_masactrl"]},
            False,
        ),
        "LEDITS++": ("ledits", {}, False),
    }


ROW_NAMES = list(rows("pipeline"))


# ------------------------------------------------------------------------------------------ pipeline calls


def run_row(pipe, row: tuple, items, inversions: dict, steps: int, guidance: float) -> list[torch.Tensor]:
    """Every call into the pipelines: invert (cached per method in ``inversions``) and edit ``items`` for one
    row (a value of `rows`). Returns [3, H, W] images in [0, 1]."""
    method, kwargs, blend = row
    if method == "ledits":
        return [ledits_edit(pipe, item, steps) for item in items]
    images = [item.image for item in items]
    sources = [item.source_prompt for item in items]
    if method not in inversions:
        shared = [m for m in SHARED_TRAJECTORY if m in inversions] if method in SHARED_TRAJECTORY else []
        if shared:  # the same w = 1 DDIM trajectory, edited another way
            inversions[method] = dataclasses.replace(inversions[shared[0]], method=method)
            inversions["seconds"][method] = inversions["seconds"][shared[0]]
        else:
            extra = {"guidance_scale": guidance} if method == "nti" else {}
            t0 = time.perf_counter()
            inversions[method] = pipe.invert(
                images, sources, num_inference_steps=steps, inversion_method=method, **extra
            )
            inversions.setdefault("seconds", {})[method] = time.perf_counter() - t0
    call = dict(kwargs)
    if blend and all(all(item.blended_word) for item in items):  # PIE-Bench leaves some blended_word empty
        words = [tuple((w,) for w in item.blended_word) for item in items]
        call["attention_control"] = dataclasses.replace(
            call["attention_control"],
            local_blend=None if blend == "reweight" else LocalBlend(words),
            reweight=[{item.blended_word[1]: REWEIGHT} for item in items],
        )
    out = pipe(
        prompt=[item.target_prompt for item in items],
        inversion=inversions[method],
        guidance_scale=guidance,
        output_type="pt",
        **call,
    )
    return list(out.images.float().cpu())


def ledits_edit(pipe, item, steps: int) -> torch.Tensor:
    """LEDITS++ (core diffusers) on the same modules: remove the source word, add the target word."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    peer = LEditsPPPipelineStableDiffusion(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    peer.set_progress_bar_config(disable=True)
    processors = pipe.unet.attn_processors
    try:
        size = item.image.shape[-1]
        generator = torch.Generator(pipe.device).manual_seed(0)
        peer.invert(
            image=item.image[None],
            source_prompt=item.source_prompt,
            num_inversion_steps=steps,
            height=size,
            width=size,
            generator=generator,
        )
        # The bracketed words: remove the source's, add the target's.
        removed, added = (
            pie_format.bracketed(item.entry["original_prompt"]),
            pie_format.bracketed(item.entry["editing_prompt"]),
        )
        words, reverse = removed + added, [True] * len(removed) + [False] * len(added)
        out = peer(
            editing_prompt=words,
            reverse_editing_direction=reverse,
            edit_guidance_scale=[5.0] * len(words),
            edit_threshold=[0.9] * len(words),
            generator=generator,
            output_type="pt",
        )
        return out.images[0].float().cpu()
    finally:
        pipe.unet.set_attn_processor(processors)  # LEDITS++ installs its own processors on the shared UNet


SHARED_TRAJECTORY = ("npi", "ddim", "direct")  # methods whose inversion is the DDIM trajectory alone
# What regenerating each inversion is called (Direct Inversion's reconstruction is the VAE row, exactly).
RECONSTRUCTIONS = {"ddim": "DDIM+CFG", "nti": "NTI", "npi": "NPI"}


@torch.no_grad()
def reconstruction_psnr(pipe, items, inversions: dict, guidance: float) -> dict[str, list[float]]:
    """Whole-image PSNR of each cached inversion regenerating its input, and of the VAE's encode–decode (the
    decoded z_0 every inversion starts from). Empty when no row inverted (LEDITS++ alone)."""
    inverted = {method: inversions[method] for method in RECONSTRUCTIONS if method in inversions}
    if not inverted:
        return {}
    sources = torch.stack([item.image for item in items])
    z0 = next(iter(inverted.values())).latents[:, 0].to(pipe.device)  # inversions keep their latents on the CPU
    decoded = (pipe.decode_latents(z0).float().cpu() / 2 + 0.5).clamp(0, 1)
    psnrs = {"VAE": [evaluate.psnr(d, s) for d, s in zip(decoded, sources)]}
    for method, inversion in inverted.items():
        images = pipe(inversion=inversion, guidance_scale=guidance, output_type="pt").images
        psnrs[RECONSTRUCTIONS[method]] = [evaluate.psnr(i.float().cpu(), s) for i, s in zip(images, sources)]
    return psnrs


# ---------------------------------------------------------------------------------------------- benchmark


def measure(items, edited, learned) -> list[dict]:
    records = []
    for item, image in zip(items, edited):
        rec = {"id": item.id, "editing_type_id": item.editing_type_id}
        rec.update(
            {f"background_{k}": v for k, v in pie_format.background_metrics(item.image, image, item.mask).items()}
        )
        rec.update(learned(item.image, image, item.mask, item.target_prompt))
        if item.truth is not None:
            rec.update(pie_bench.toy_metrics(image, item.truth))
        records.append(rec)
    return records


def mean(values):
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def summarise(records: list[dict]) -> dict:
    keys = [k for k in records[0] if k not in ("id", "editing_type_id")]
    summary = {k: mean([r[k] for r in records]) for k in keys}
    summary["by_type"] = {
        t: {k: mean([r[k] for r in records if r["editing_type_id"] == t]) for k in keys}
        for t in sorted({r["editing_type_id"] for r in records})
    }
    return summary


COLUMNS = [
    ("background_psnr", "bg PSNR", "{:.2f}"),
    ("background_mse", "bg MSE ×10⁴", "{:.1f}", 1e4),
    ("background_ssim", "bg SSIM ×10²", "{:.2f}", 1e2),
    ("structure_distance", "struct ×10³", "{:.2f}", 1e3),
    ("lpips", "LPIPS ×10³", "{:.1f}", 1e3),
    ("clip_whole", "CLIP whole", "{:.2f}"),
    ("clip_edited", "CLIP edited", "{:.2f}"),
    ("edit_psnr", "edit PSNR", "{:.2f}"),
    ("unedited_psnr_exact", "unedited PSNR", "{:.2f}"),
    ("attribute_ok", "attribute acc.", "{:.1%}"),
    ("objects_kept", "objects kept", "{:.1%}"),
    ("seconds", "s / image", "{:.3f}"),
]


def markdown(result) -> str:
    rows = result["rows"]
    present = [c for c in COLUMNS if any(c[0] in s for s in rows.values())]
    lines = ["| row | items | " + " | ".join(c[1] for c in present) + " |", "|---|---:|" + "---:|" * len(present)]
    for name, s in rows.items():
        cells = []
        for key, _, fmt, *scale in present:
            v = s.get(key, float("nan"))
            cells.append("—" if isinstance(v, float) and math.isnan(v) else fmt.format(v * (scale[0] if scale else 1)))
        lines.append(f"| {name} | {result['items'][name]} | " + " | ".join(cells) + " |")
    if result["reconstruction"]:
        lines += [
            "",
            f"Reconstruction (no edit, guidance {result['args']['guidance']}), whole-image PSNR:",
            "",
            "| inversion | items | PSNR (dB) |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {len(v)} | {mean(v):.2f} |" for name, v in result["reconstruction"].items()]
    lines += pareto_markdown(rows)
    lines += [""] + [f"- {m}" for m in result["skipped"].values()]
    return "\n".join(lines) + "\n"


PARETO = ("unedited_psnr_exact", "attribute_ok")  # keep the unedited image, reach the target: both higher is better


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """The names whose point no other point matches or beats on both coordinates and beats on one."""

    def beaten(p):
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())

    return {name for name, point in points.items() if not beaten(point)}


def pareto_markdown(rows: dict) -> list[str]:
    """Unedited PSNR against attribute accuracy (toy folders: exact masks and judge), overall and per editing
    type; ★ marks the rows on the Pareto front of that column."""
    summaries = {name: s for name, s in rows.items() if all(not math.isnan(s.get(key, math.nan)) for key in PARETO)}
    if not summaries:
        return []
    types = sorted({t for s in summaries.values() for t in s["by_type"]})
    columns = {"overall": summaries}
    for t in types:
        columns[pie_format.EDITING_TYPES.get(t, t)] = {
            name: s["by_type"][t] for name, s in summaries.items() if t in s["by_type"]
        }
    fronts = {}
    for column, cells in columns.items():
        points = {
            name: tuple(cell[key] for key in PARETO)
            for name, cell in cells.items()
            if not any(math.isnan(cell[key]) for key in PARETO)
        }
        fronts[column] = (points, pareto_front(points))
    lines = [
        "",
        "Unedited PSNR (dB) / attribute accuracy, overall and per editing type; ★ Pareto-optimal in its"
        " column (no other row keeps the unedited image better and reaches the attribute as often or more):",
        "",
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in summaries:
        cells = []
        for points, front in fronts.values():
            point = points.get(name)
            cells.append(
                "—" if point is None else f"{point[0]:.2f} / {point[1]:.1%}" + (" ★" if name in front else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="a PIE-Bench folder (mapping_file.json + annotation_images/)")
    p.add_argument("--write-toy", type=int, default=0, metavar="N", help="first write N toy-world pairs to --data")
    p.add_argument("--seed", type=int, default=0, help="toy pairs' seed")
    p.add_argument("--res", type=int, default=evaluate.MODEL_RES, help="toy pairs' resolution (the model's: v2 128)")
    p.add_argument("--model", default=str(evaluate.MODEL_DIR))
    p.add_argument("--out", required=True)
    p.add_argument(
        "--rows",
        nargs="+",
        default=ROW_NAMES,
        choices=ROW_NAMES,
        metavar="ROW",
        help=f"the rows to run (default: all): {', '.join(ROW_NAMES)}",
    )
    p.add_argument(
        "--protocol",
        default="pipeline",
        choices=list(PROTOCOLS),
        help="the rows' P2P and proximal settings: the pipeline's defaults, or the reference code's",
    )
    p.add_argument("--types", nargs="+", default=None, help="editing_type_id values to keep")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="default: fp16 on CUDA (bfloat16 with --fp8)",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        help="run the UNet's linear layers in FP8 (pipe.enable_fp8(): torchao, CUDA sm_89+, bfloat16)",
    )
    p.add_argument(
        "--peer-limit",
        type=int,
        default=None,
        metavar="N",
        help="run LEDITS++ on the first N items only (rounded up to whole batches)",
    )
    p.add_argument("--grid", type=int, default=8, help="items in OUT/examples.png (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.write_toy:
        pie_bench.write_pie_bench(args.data, args.write_toy, args.seed, args.res)
    items = pie_bench.read_pie_bench(args.data, types=args.types, limit=args.limit)
    if not items:
        p.error(f"no items in --data {args.data} (with --types {args.types}, --limit {args.limit})")
    dtype = getattr(torch, pipe_dtype(args))
    pipe = evaluate.load_pipeline(args.model, device=args.device, dtype=dtype)
    if args.fp8:  # recorded with the arguments: how many of the UNet's linear layers torchao could convert
        args.linear_layers = sum(isinstance(module, torch.nn.Linear) for module in pipe.unet.modules())
        args.fp8_linear_layers = pipe.enable_fp8()
        print(f"FP8: {args.fp8_linear_layers} of {args.linear_layers} UNet linear layers", flush=True)
    learned = pie_format.LearnedMetrics(args.device)
    for message in learned.skipped.values():
        print(message, flush=True)

    settings = rows(args.protocol)
    records = {row: [] for row in args.rows}
    reconstruction: dict[str, list[float]] = {}
    examples = {row: [] for row in args.rows}  # the first batch's edits, for the example grid
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for first in range(0, len(items), args.batch_size):
        batch = items[first : first + args.batch_size]
        inversions: dict = {}
        for row in args.rows:
            if row == "LEDITS++" and args.peer_limit is not None and first >= args.peer_limit:
                continue  # one image per call: 60x the others' time per image
            method = settings[row][0]
            reused = inversions.get("seconds", {}).get(method, 0.0) if method in inversions else 0.0
            t0 = time.perf_counter()
            edited = run_row(pipe, settings[row], batch, inversions, args.steps, args.guidance)
            seconds = (time.perf_counter() - t0 + reused) / len(batch)  # every row pays its inversion
            for rec in measure(batch, edited, learned):
                records[row].append(dict(rec, seconds=seconds))
            if first == 0:
                examples[row] = edited[: args.grid]
            print(f"[{time.time() - start:7.1f}s] {row}: items {first}..{first + len(batch) - 1}", flush=True)
        for name, psnrs in reconstruction_psnr(pipe, batch, inversions, args.guidance).items():
            reconstruction.setdefault(name, []).extend(psnrs)
        # Written after every batch, so a run stopped by a time limit keeps what it finished.
        table = write_results(out, args, records, reconstruction, learned.skipped)
        if first == 0 and args.grid:
            example_grid(batch[: args.grid], examples).save(out / "examples.png", optimize=True)
    print(table)


def example_grid(items, examples: dict):
    """Input, true edit (toy world; black otherwise), then each row's edit, one line per item."""
    pairs = [
        SimpleNamespace(
            source_image=item.image,
            target_image=item.truth["target_image"] if item.truth else torch.zeros_like(item.image),
        )
        for item in items
    ]
    return evaluate.example_grid(pairs, {"images": examples}, count=len(items))


def write_results(out: Path, args, records: dict, reconstruction: dict, skipped: dict) -> str:
    result = {
        "args": vars(args),
        "items": {row: len(recs) for row, recs in records.items()},
        "skipped": skipped,
        "rows": {row: summarise(recs) for row, recs in records.items() if recs},
        "records": records,
        "reconstruction": reconstruction,
    }
    (out / "pie_bench.json").write_text(evaluate.compact_json(result))
    table = markdown(result)
    precision = f", FP8 linear layers {args.fp8_linear_layers} of {args.linear_layers}" if args.fp8 else ""
    (out / "pie_bench.md").write_text(
        f"Items from `{args.data}`, model `{args.model}`, {args.steps} steps, "
        f"guidance {args.guidance}, protocol `{args.protocol}`, {pipe_dtype(args)}"
        f"{precision}\n\n" + table
    )
    return table


def pipe_dtype(args) -> str:
    """The pipeline's dtype: ``--dtype``, else float16 on CUDA (bfloat16 for FP8), float32 on a CPU."""
    return args.dtype or ("bfloat16" if args.fp8 else "float16" if args.device.startswith("cuda") else "float32")


if __name__ == "__main__":
    main()
