"""Where does proximal guidance's edit mask fall? On toy v2 pairs, NPI+P2P with proximal guidance returns its edit
masks; this reports, per edit kind, the mean fraction of steps in which a pixel of the truly edited region, and of
the rest, counted as edited. Inversion guidance pins the rest to the inversion, so an edit whose region the mask
misses cannot happen. ``--setting`` is a `toy_p2p_settings.py` setting; the default is ProxNPI+P2P as `pie_bench.py`
runs it with the pipeline's defaults.

    python benchmarks/toy_proximal_mask.py --pairs 48 --kinds background colour     # CPU, ~6 minutes
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from benchmarks.toy_p2p_settings import KINDS, edit_arguments, parse_setting
from toy_world import evaluate


ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(evaluate.MODEL_DIR))
    p.add_argument("--pairs", type=int, default=48, help="pairs generated before keeping --kinds")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS)
    p.add_argument("--setting", default="rw=2,prox=0.7", help="a toy_p2p_settings.py setting (with prox > 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    setting = parse_setting(args.setting)
    if not setting["prox"]:
        p.error(f"--setting {args.setting!r} has no proximal guidance (prox=q with q > 0)")
    torch.set_num_threads(args.threads)

    pipe = evaluate.load_pipeline(args.model, device=args.device)
    pairs = [e for e in evaluate.make_pairs(args.pairs, seed=args.seed) if e.kind in args.kinds]
    with torch.no_grad():
        inversion = pipe.invert(
            [e.source_image for e in pairs],
            [e.source_caption for e in pairs],
            num_inference_steps=args.steps,
            inversion_method="npi",
        )
        out = pipe(
            prompt=[e.target_caption for e in pairs],
            inversion=inversion,
            output_type="pt",
            return_edit_mask=True,
            **edit_arguments(setting, pairs),
        )
    print("| kind | pairs | edited region: fraction of steps in the mask | the rest | attribute right |")
    print("|---|---:|---:|---:|---:|")
    for kind in args.kinds:
        rows = []
        for edit, image, mask in zip(pairs, out.images, out.edit_masks):
            if edit.kind == kind:
                fraction = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)
                rows.append(
                    (
                        fraction[edit.mask].mean().item(),
                        fraction[~edit.mask].mean().item(),
                        evaluate.attribute_ok(image.float().cpu(), edit),
                    )
                )
        if rows:
            inside, rest, ok = (statistics.mean(map(float, column)) for column in zip(*rows))
            print(f"| {kind} | {len(rows)} | {inside:.2f} | {rest:.2f} | {ok:.0%} |")


if __name__ == "__main__":
    main()
