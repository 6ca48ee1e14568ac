"""Is prompt-to-prompt's failure on the toy model the model's or the pipeline's? (toy-world v2 issue, step 1)

For colour and shape word swaps of the toy world it measures, on a pipeline folder (default: the embedded v2 model):

* where each object word attends: the peak of each object's colour- and shape-word map, at every
  cross-attention level, against the object's true pixel mask;
* the local blend mask's area against the edited object's area;
* the same NPI + P2P edit (cross 0.4, self 0.6, local blend) through the pipeline and through the independent
  minimal implementation in ``toy_world/p2p_reference.py``, and how far apart the two images are;
* the pipeline with and without ``blend_words`` (does local blend do anything?);
* the reference's local blend at every map level (would a finer level fix it?).

Writes ``OUT/diagnosis.json``, ``OUT/diagnosis_numbers.md`` and ``OUT/diagnosis.png``::

    python benchmarks/toy_p2p_diagnosis.py --pairs 12 --out benchmarks/results/toy_v2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from negative_prompt_inversion.pipeline_negative_prompt_inversion import LocalBlend, PromptToPrompt
from toy_world import evaluate, scenes
from toy_world.p2p_reference import ReferenceP2P


ROOT = Path(__file__).resolve().parents[1]


def cell_fraction(mask: torch.Tensor, size) -> torch.Tensor:
    """Fraction of each map cell covered by a boolean pixel mask: [h, w]."""
    return F.adaptive_avg_pool2d(mask.float()[None, None], size)[0, 0]


def peak_hits(word_map: torch.Tensor, obj_mask: torch.Tensor) -> tuple[bool, bool]:
    """(peak cell touches the object, peak cell is at least half object)."""
    cover = cell_fraction(obj_mask, word_map.shape)
    peak = int(word_map.flatten().argmax())
    c = float(cover.flatten()[peak])
    return c > 0, c >= 0.5


def mean(xs):
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(evaluate.MODEL_DIR))
    p.add_argument("--res", type=int, default=evaluate.MODEL_RES, help="render size of the scenes (the model's)")
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/toy_v2"))
    p.add_argument("--tag", default="v2")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared machine, more threads than free cores is far slower)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = evaluate.load_pipeline(args.model, device=args.device)
    ref = ReferenceP2P(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    pairs, i = [], 0
    while len(pairs) < args.pairs:  # colour and shape swaps only: one token each, identity mapper
        kind = ("colour", "shape")[len(pairs) % 2]
        pairs.append(scenes.make_edit(scenes.sample_scene(7_000_000 + i), kind, i, res=args.res))
        i += 1

    p2p = PromptToPrompt(cross_replace_steps=0.4, self_replace_steps=0.6)
    rows, pictures = [], []
    start = time.time()
    for n, edit in enumerate(pairs):
        words = evaluate.blend_words(edit)
        bw = (words[0][0], words[1][0])
        src = edit.source_image
        inv = pipe.invert(src[None], edit.source_caption, num_inference_steps=args.steps, inversion_method="npi")
        with torch.no_grad():

            def run(control, **kw):
                return pipe(
                    prompt=edit.target_caption,
                    inversion=inv,
                    output_type="pt",
                    num_inference_steps=args.steps,
                    attention_control=control,
                    **kw,
                )

            piped = run(dataclasses.replace(p2p, local_blend=LocalBlend(bw)), return_attention_maps=True)
            no_blend = run(p2p).images[0].cpu()
            latent0 = pipe.encode_images(src[None].to(pipe.device) * 2 - 1)
            level = piped.attention_maps[0].shape[:2]
            r = ref.edit(latent0, edit.source_caption, edit.target_caption, bw, steps=args.steps, blend_size=level)
            ref_img = (pipe.decode_latents(r.latents[1:]).float().cpu() / 2 + 0.5).clamp(0, 1)[0]
            finest = max(r.maps, key=lambda s: s[0])
            r_fine = ref.edit(
                latent0, edit.source_caption, edit.target_caption, bw, steps=args.steps, blend_size=finest
            )
            ref_fine_img = (pipe.decode_latents(r_fine.latents[1:]).float().cpu() / 2 + 0.5).clamp(0, 1)[0]
        img = piped.images[0].cpu()
        keep = ~edit.mask[None]
        src_scene = edit.source_scene
        rendered = scenes.render(src_scene, args.res)
        # word localisation at every level, from the reference's source-row maps
        loc = {}
        for size, maps in sorted(r.maps.items()):
            hits = []
            pos, _ = src_scene.word_positions()
            for k, obj_pos in enumerate(pos):
                for role in ("colour", "shape"):
                    hits.append(peak_hits(maps[0, :, :, obj_pos[role] + 1], rendered["masks"][k]))
            loc[f"{size[0]}x{size[1]}"] = dict(touch=mean([h[0] for h in hits]), half=mean([h[1] for h in hits]))
        obj_area = float(edit.mask.float().mean())
        row = dict(
            kind=edit.kind,
            object_area=obj_area,
            map_level=list(level),
            localisation=loc,
            pipeline_blend_area=float(r.masks[-1].float().mean()),  # same level/threshold as the pipeline's
            finest_blend_area=float(r_fine.masks[-1].float().mean()),
            blend_area_min_over_steps=float(r.masks.float().mean(dim=(1, 2, 3)).min()),
            pipeline_unedited_psnr=evaluate.psnr(img, src, keep),
            no_blend_unedited_psnr=evaluate.psnr(no_blend, src, keep),
            blend_vs_no_blend_max_abs=float((img - no_blend).abs().max()),
            reference_unedited_psnr=evaluate.psnr(ref_img, src, keep),
            reference_finest_unedited_psnr=evaluate.psnr(ref_fine_img, src, keep),
            pipeline_vs_reference_psnr=evaluate.psnr(img, ref_img),
            pipeline_attribute_ok=evaluate.attribute_ok(img, edit),
            reference_attribute_ok=evaluate.attribute_ok(ref_img, edit),
            reference_finest_attribute_ok=evaluate.attribute_ok(ref_fine_img, edit),
        )
        rows.append(row)
        if n < 4:
            word_pos = edit.source_positions[0] + 1
            pictures.append(
                dict(
                    src=src,
                    tgt=edit.target_image,
                    pipe=img,
                    ref=ref_img,
                    ref_fine=ref_fine_img,
                    maps={s: m[0, :, :, word_pos] for s, m in r.maps.items()},
                    mask=r.masks[-1].float().expand(3, -1, -1),
                    fine_mask=r_fine.masks[-1].float().expand(3, -1, -1),
                    label=f"{edit.kind}: {bw[0]}->{bw[1]}",
                )
            )
        print(f"[{time.time() - start:6.1f}s] pair {n}: {json.dumps(row)}", flush=True)
        write(out, args, rows, pictures)  # after every pair: a long run may be cut short
    print(markdown(summarise(rows), args))


def write(out: Path, args, rows: list, pictures: list) -> None:
    summary, tag = summarise(rows), args.tag
    (out / f"diagnosis_{tag}.json").write_text(json.dumps(dict(args=vars(args), summary=summary, rows=rows), indent=1))
    (out / f"diagnosis_{tag}_numbers.md").write_text(markdown(summary, args))
    picture(pictures).save(out / f"diagnosis_{tag}.png")


def summarise(rows):
    s = {}
    for key in (
        "object_area",
        "pipeline_blend_area",
        "finest_blend_area",
        "blend_area_min_over_steps",
        "pipeline_unedited_psnr",
        "no_blend_unedited_psnr",
        "blend_vs_no_blend_max_abs",
        "reference_unedited_psnr",
        "reference_finest_unedited_psnr",
        "pipeline_vs_reference_psnr",
    ):
        s[key] = mean([r[key] for r in rows])
    for key in ("pipeline_attribute_ok", "reference_attribute_ok", "reference_finest_attribute_ok"):
        s[key] = mean([float(r[key]) for r in rows])
    s["blend_area_over_object_area"] = mean([r["pipeline_blend_area"] / r["object_area"] for r in rows])
    s["finest_blend_area_over_object_area"] = mean([r["finest_blend_area"] / r["object_area"] for r in rows])
    s["localisation"] = {
        lvl: {k: mean([r["localisation"][lvl][k] for r in rows]) for k in ("touch", "half")}
        for lvl in rows[0]["localisation"]
    }
    s["map_level"] = rows[0]["map_level"]
    s["pairs"] = len(rows)
    return s


def markdown(s, args) -> str:
    lines = [
        f"Model `{args.model}`, {s['pairs']} colour/shape swaps, {args.steps} steps, guidance 7.5, NPI + P2P "
        f"(cross 0.4, self 0.6, blend threshold 0.3, pipeline map level {s['map_level'][0]}×{s['map_level'][1]}).",
        "",
        "| word-map peak in the object (colour and shape words, every object) | touches | ≥ half the cell |",
        "|---|---:|---:|",
    ]
    for lvl, v in s["localisation"].items():
        lines.append(f"| {lvl} map | {100 * v['touch']:.0f}% | {100 * v['half']:.0f}% |")
    lines += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| edited-object area (pixels) | {100 * s['object_area']:.1f}% |",
        f"| blend mask area, pipeline's level, last step | {100 * s['pipeline_blend_area']:.1f}% "
        f"({s['blend_area_over_object_area']:.1f}× the object) |",
        f"| blend mask area, smallest step (mean) | {100 * s['blend_area_min_over_steps']:.1f}% |",
        f"| blend mask area, finest level, last step | {100 * s['finest_blend_area']:.1f}% "
        f"({s['finest_blend_area_over_object_area']:.1f}× the object) |",
        f"| pipeline: unedited PSNR with / without blend words | {s['pipeline_unedited_psnr']:.2f} / "
        f"{s['no_blend_unedited_psnr']:.2f} dB |",
        f"| pipeline: max abs difference with vs without blend words | {s['blend_vs_no_blend_max_abs']:.2e} |",
        f"| reference P2P: unedited PSNR (pipeline's level / finest level) | {s['reference_unedited_psnr']:.2f}"
        f" / {s['reference_finest_unedited_psnr']:.2f} dB |",
        f"| pipeline image vs reference image, PSNR | {s['pipeline_vs_reference_psnr']:.1f} dB |",
        f"| attribute accuracy: pipeline / reference / reference at finest level | "
        f"{100 * s['pipeline_attribute_ok']:.0f}% / {100 * s['reference_attribute_ok']:.0f}% / "
        f"{100 * s['reference_finest_attribute_ok']:.0f}% |",
    ]
    return "\n".join(lines) + "\n"


def picture(items, cell: int = 96):
    """Rows: source, truth, pipeline, reference, reference at the finest level, the edited word's maps per level,
    the blend masks (pipeline's level, finest level)."""
    from PIL import Image, ImageDraw

    def tile(x):
        x = x.float().cpu()
        if x.dim() == 2:
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
            x = torch.stack([x, 0.2 + 0 * x, 1 - x])
        x = F.interpolate(x[None], size=(cell, cell), mode="nearest")[0]
        return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())

    levels = sorted(items[0]["maps"], reverse=True)
    titles = (
        ["source", "truth", "pipeline", "reference", "ref. finest"]
        + [f"word {a}x{b}" for a, b in levels]
        + ["blend mask", "finest mask"]
    )
    label = 14
    grid = Image.new("RGB", (len(titles) * cell, label + len(items) * (cell + label)), "white")
    d = ImageDraw.Draw(grid)
    for c, t in enumerate(titles):
        d.text((c * cell + 2, 1), t, fill="black")
    for r, it in enumerate(items):
        y = label + r * (cell + label)
        tiles = (
            [it["src"], it["tgt"], it["pipe"], it["ref"], it["ref_fine"]]
            + [it["maps"][s] for s in levels]
            + [it["mask"], it["fine_mask"]]
        )
        for c, t in enumerate(tiles):
            grid.paste(tile(t), (c * cell, y))
        d.text((2, y + cell), it["label"], fill="black")
    return grid


if __name__ == "__main__":
    main()
