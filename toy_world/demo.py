"""The README's main command: invert a toy scene and edit it with every method, writing a picture grid.

    python -m toy_world.demo                       # → outputs/demo.png (input, ground truth, each method)

Runs on the embedded toy model (``toy_world/model_v2``, 128 px) on the CPU in about four minutes (null-text
inversion is most of it); no downloads.
"""

import argparse
import json
from pathlib import Path

import torch

from . import evaluate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo.png", help="where to write the grid image")
    parser.add_argument(
        "--scenes", type=int, default=4, help="one scene per edit kind (colour, shape, background, pattern)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--methods", nargs="+", default=list(evaluate.METHODS), choices=list(evaluate.METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pipe = evaluate.load_pipeline(device=args.device)
    pairs = evaluate.make_pairs(args.scenes, args.seed)
    for pair in pairs:
        print(f"{pair.kind:>10}: {pair.source_caption!r} → {pair.target_caption!r}")
    result = evaluate.evaluate(pipe, pairs, args.methods, steps=args.steps, batch_size=len(pairs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    evaluate.example_grid(pairs, result, count=len(pairs), scale=3).save(out)
    summary = evaluate.summarise(result)
    print(evaluate.markdown_table(summary))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
