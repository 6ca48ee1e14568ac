"""Which cross-attention maps should local blend read on the toy v2 model? NPI + P2P with `LocalBlend` at each map
level and threshold (and a few replacement windows), on toy-world pairs of every edit kind.

    python benchmarks/toy_blend_level.py --pairs 16 --steps 25 --out benchmarks/results/toy_v2   # CPU, ~9 min

For each setting: unedited-region PSNR (on the exact mask), attribute accuracy and objects kept (the toy judge).
Writes ``OUT/blend_level.json`` and ``OUT/blend_level.md``. The mask's area at each level is
``toy_p2p_diagnosis.py``'s to measure (it needs the source's maps as well as the target's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_negative_prompt_inversion import LocalBlend, PromptToPrompt  # noqa: E402
from toy_world import evaluate  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(evaluate.MODEL_DIR))
    p.add_argument("--res", type=int, default=evaluate.MODEL_RES)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--settings", nargs="+",
                   default=["2:0.3", "1:0.3", "1:0.5", "0:0.3", "1:0.3:0.2:0.4", "1:0.3:0.8:0.2"],
                   help="LEVEL:THRESHOLD[:CROSS:SELF] (level: 2x downsamplings below the latent; P2P's cross- and "
                        "self-attention replacement windows, default 0.4:0.6)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/toy_v2"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = evaluate.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    pairs = evaluate.make_pairs(args.pairs, seed=args.seed, res=args.res)
    inversion = pipe.invert([e.source_image for e in pairs], [e.source_caption for e in pairs],
                            num_inference_steps=args.steps)
    words = [evaluate.blend_words(e) for e in pairs]
    results = {}
    for setting in args.settings:
        level, threshold, cross, self_ = (float(v) for v in (setting + ":0.4:0.6").split(":")[:4])
        blend = LocalBlend(words, threshold=threshold, map_level=int(level))
        start = time.time()
        with torch.no_grad():
            out = pipe(prompt=[e.target_caption for e in pairs], inversion=inversion, output_type="pt",
                       attention_control=PromptToPrompt(cross, self_, local_blend=blend), return_attention_maps=True)
        rows = []
        for k, edit in enumerate(pairs):
            image = out.images[k].float().cpu()
            rows.append(dict(kind=edit.kind, unedited_psnr=evaluate.psnr(image, edit.source_image, ~edit.mask[None]),
                             attribute_ok=evaluate.attribute_ok(image, edit),
                             objects_kept=evaluate.objects_kept(image, edit)))
        size = tuple(out.attention_maps[0].shape[:2])
        results[setting] = dict(map_size=size, threshold=threshold, windows=(cross, self_), rows=rows)
        print(f"[{time.time() - start:5.0f}s] {setting} ({size[0]}x{size[1]}): "
              + json.dumps(summary(rows)), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "blend_level.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=1))
    (out_dir / "blend_level.md").write_text(markdown(results, args))
    print(markdown(results, args))


def summary(rows) -> dict:
    mean = statistics.mean
    s = {key: mean(float(r[key]) for r in rows) for key in ("unedited_psnr", "attribute_ok", "objects_kept")}
    s["unedited_psnr_by_kind"] = {kind: round(mean(r["unedited_psnr"] for r in rows if r["kind"] == kind), 2)
                                  for kind in sorted({r["kind"] for r in rows})}
    return s


def markdown(results, args) -> str:
    lines = [f"`{args.model}`, {args.pairs} pairs (every edit kind), {args.steps} steps, guidance 7.5, NPI + "
             "P2P with `LocalBlend` on the changed words.", "",
             "| map level | maps | threshold | P2P windows (cross, self) | unedited PSNR | attribute acc. | objects kept "
             "| unedited PSNR by kind |",
             "|---:|---|---:|---|---:|---:|---:|---|"]
    for setting, r in results.items():
        s = summary(r["rows"])
        lines.append(f"| {setting.split(':')[0]} | {r['map_size'][0]}×{r['map_size'][1]} | {r['threshold']} | "
                     f"{r['windows'][0]}, {r['windows'][1]} | "
                     f"{s['unedited_psnr']:.2f} dB | {s['attribute_ok']:.0%} | {s['objects_kept']:.0%} | "
                     + ", ".join(f"{k} {v:.1f}" for k, v in s["unedited_psnr_by_kind"].items()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
