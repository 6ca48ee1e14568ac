"""Toy-world editing benchmark: edit accuracy against the true edited image, for every inversion/edit method.

    python benchmarks/toy_edit_benchmark.py --pairs 200 --device cuda --out benchmarks/results/toy_v2_edit
    python benchmarks/toy_edit_benchmark.py --model DIR --res 64 ...   # another toy model, at its image size

Writes ``toy_edit.json`` (per-method means, per-kind breakdown, model quality), ``toy_edit.md`` (tables) and
``toy_edit_grid.png`` (input, ground truth, each method) to ``--out``. The pair set is fixed by ``--seed``.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from toy_world import evaluate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(evaluate.MODEL_DIR))
    parser.add_argument("--res", type=int, default=evaluate.MODEL_RES, help="the model's image size (v2: 128)")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(evaluate.METHODS), choices=list(evaluate.METHODS))
    parser.add_argument("--quality-samples", type=int, default=100, help="0 skips the model-quality section")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/toy")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = evaluate.load_pipeline(args.model, device=args.device)
    pairs = evaluate.make_pairs(args.pairs, args.seed, res=args.res)
    result = evaluate.evaluate(pipe, pairs, args.methods, steps=args.steps, batch_size=args.batch_size)
    summary = evaluate.summarise(result)
    summary["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    summary["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    if args.quality_samples:
        quality = evaluate.model_quality(pipe, args.quality_samples, args.steps, res=args.res)
        quality.pop("samples")
        summary["model_quality"] = quality
    summary["wall_seconds"] = time.perf_counter() - started
    (out / "toy_edit.json").write_text(json.dumps(summary, indent=2))
    table = evaluate.markdown_table(summary)
    heading = f"Toy-world editing benchmark: {args.pairs} pairs, {args.steps} steps, device {summary['device']}\n\n"
    (out / "toy_edit.md").write_text(heading + table + "\n")
    evaluate.example_grid(pairs, result).save(out / "toy_edit_grid.png", optimize=True)
    print(heading + table)
    if "model_quality" in summary:
        print(json.dumps(summary["model_quality"], indent=2))


if __name__ == "__main__":
    main()
