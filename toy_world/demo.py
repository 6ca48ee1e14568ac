"""The README's main command: invert four toy scenes, one per edit kind, and edit each with the recommended recipe,
writing a labelled picture grid.

    python -m toy_world.demo                  # -> outputs/demo.png: input, true edit, the recipe's edit
    python -m toy_world.demo --compare        # every method side by side, with a metrics table (slower)

The recipe (README, "Which recipe for which edit"): Direct Inversion, the pipeline's default, with prompt-to-prompt;
a local blend on the changed words where they name an object (colour, shape, pattern). A background word attends
weakly across the background, so a blend on it would leave the old colour around each object: a background edit
blends on the objects' words instead, keeping what they cover (``LocalBlend(keep=True)``).
Runs on the embedded toy model (``toy_world/model_v2``, 128 px) on the CPU; no downloads.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from . import evaluate, scenes


def recipe(pipe, edit) -> dict:
    """The recommended editing arguments for a toy edit: P2P re-weighting the new word by 2 (PnPInversion's PIE-Bench
    setting), with a local blend on the changed words; a background edit instead keeps what the objects' words
    cover, at the finest maps, and lets the last fifth of the steps heal the seams."""
    source_words, target_words = evaluate.blend_words(edit)
    if edit.kind == "background":
        blend = pipe.LocalBlend.keeping(evaluate.object_words(edit)[0])
    else:
        blend = pipe.LocalBlend((source_words, target_words))
    return {"attention_control": pipe.PromptToPrompt(reweight=dict.fromkeys(target_words, 2.0), local_blend=blend)}


def changed(words) -> str:
    """A row label's side of the edit: the words that change, or "none" (a pattern removed, a shape added)."""
    return " ".join(words) or "none"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo.png", help="where to write the grid image")
    parser.add_argument("--seed", type=int, default=1, help="which toy scenes (one per edit kind)")
    parser.add_argument(
        "--steps", type=int, default=25, help="DDIM steps of inversion and editing (the benchmarks use 50)"
    )
    parser.add_argument("--compare", action="store_true", help="every method side by side instead of the recipe")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(evaluate.METHODS),
        choices=list(evaluate.METHODS),
        help="with --compare: the methods",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=str(evaluate.MODEL_DIR), help="a toy-world model folder")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    print("loading the embedded toy model …", flush=True)
    pipe = evaluate.load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=False, leave=False)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pairs = evaluate.make_pairs(len(scenes.EDIT_KINDS), args.seed, res=size)
    labels = [
        f"{pair.kind}: {changed(pair.source_words)} -> {changed(pair.target_words)}\n"
        f"{pair.source_caption!r}\n-> {pair.target_caption!r}"
        for pair in pairs
    ]
    print("\n".join(labels), flush=True)

    if args.compare:
        result = evaluate.evaluate(pipe, pairs, args.methods, steps=args.steps, batch_size=len(pairs))
        summary = evaluate.summarise(result)
        print(evaluate.markdown_table(summary))
    else:
        print(f"inverting {len(pairs)} images (Direct Inversion, {args.steps} steps) …", flush=True)
        inversion = pipe.invert(
            [pair.source_image for pair in pairs],
            [pair.source_caption for pair in pairs],
            num_inference_steps=args.steps,
        )
        edited = []
        for index, pair in enumerate(pairs):
            print(f"editing {pair.kind} …", flush=True)
            output = pipe(
                prompt=pair.target_caption, inversion=inversion[index], output_type="pt", **recipe(pipe, pair)
            )
            edited.append(output.images[0].float().cpu())
        result = {"images": {"recipe: DI + P2P": edited}}
        summary = {
            pair.kind: {
                "attribute_ok": evaluate.attribute_ok(image, pair),
                "objects_kept": evaluate.objects_kept(image, pair),
                "unedited_psnr": evaluate.psnr(image, pair.source_image, ~pair.mask[None]),
            }
            for pair, image in zip(pairs, edited)
        }
        for kind, verdict in summary.items():
            print(
                f"{kind:>10}: target reached {verdict['attribute_ok']}, objects kept {verdict['objects_kept']},"
                f" unedited region {verdict['unedited_psnr']:.1f} dB"
            )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    evaluate.example_grid(pairs, result, count=len(pairs), scale=3, row_labels=labels).save(out, optimize=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
