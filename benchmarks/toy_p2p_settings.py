"""Which prompt-to-prompt settings edit the toy v2 world best? NPI (or Direct Inversion) + P2P with `LocalBlend`
under each setting of local blend's map level, threshold, start, stop and words, the replacement windows and the
target word's re-weighting, on toy-world pairs of every edit kind.

    python benchmarks/toy_p2p_settings.py --pairs 16 --steps 25 --out DIR                   # CPU, ~1.5 min a setting
    python benchmarks/toy_p2p_settings.py --pairs 200 --steps 50 --device cuda --out DIR    # GPU, ~15 s a setting

A setting is ``key=value`` pairs joined by commas; unnamed keys keep the references' values:
``level`` (local blend's map level: 2× downsamplings below the latent; ``auto`` is the pipeline's default),
``th`` (0.3), ``start`` (0.2), ``cross`` (0.4), ``self`` (0.6), ``rw`` (factor on the target's blend word; 1: none,
as P2P's defaults; PnPInversion's benchmark runs use 2),
``blend`` (1; 0: no local blend), ``g`` (the guidance scale, 7.5), ``phi`` (the guidance rescale factor, 0),
``edit`` (``auto``: word swap for equal word counts, else refinement, the pipeline's default; ``refine``: always
refinement, as PnPInversion's runs; ``replace``), ``prox`` (proximal guidance's quantile, soft mode; 0: none),
``ig`` (1: proximal guidance's inversion guidance on, as the pipeline's default; 0: off), ``inv`` (``npi``: edit the
NPI inversion as NPI; ``direct``: as Direct Inversion, the call's ``inversion_method="direct"``: source pinned to
the trajectory, targets guided against E("")), ``keep`` (1: local blend on every object's words with the mask
inverted, ``LocalBlend(keep=True)``: the target is edited everywhere except where the objects' words attend; 0: on
the changed words), ``stop`` (1.0: fraction of the steps after which local blend stops applying) and ``neg``
(``none``; ``source``: ``negative_prompt`` = the source caption, so that Direct Inversion's targets are guided
against E(source) as NPI's are).
``cross=0,self=0,blend=0`` amounts to NPI editing with no attention control. Settings hold no spaces, so a file of
them, one a line, passes as ``--settings $(cat FILE)`` (``benchmarks/background_sweep.txt``).
For each: unedited-region PSNR on the exact mask, attribute accuracy and objects kept (the toy judge), overall and
per edit kind. Writes ``OUT/p2p_settings.json``, ``OUT/p2p_settings.md`` and ``OUT/p2p_settings.png`` (the first
``--grid`` pairs under every setting). The mask's area is ``toy_p2p_diagnosis.py``'s to measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from negative_prompt_inversion.pipeline_negative_prompt_inversion import LocalBlend, PromptToPrompt, ProximalGuidance
from toy_world import evaluate


ROOT = Path(__file__).resolve().parents[1]


REFERENCE = {
    "level": "auto",
    "th": 0.3,
    "start": 0.2,
    "cross": 0.4,
    "self": 0.6,
    "rw": 1.0,
    "blend": 1.0,
    "g": 7.5,
    "phi": 0.0,
    "edit": "auto",
    "prox": 0.0,
    "ig": 1.0,
    "inv": "npi",
    "keep": 0.0,
    "stop": 1.0,
    "neg": "none",
}
WORDS = {
    "level": ("auto",),
    "edit": ("auto", "refine", "replace"),
    "inv": ("npi", "direct"),
    "neg": ("none", "source"),
}  # keys taking words
DEFAULT_SETTINGS = [
    "level=2",
    "",
    "th=0.5",
    "level=0",
    "cross=0.2,self=0.4",
    "cross=0.8,self=0.2",
    "rw=2",
    "rw=2,self=0.4",
    "rw=2,self=0.2",
    "rw=2,cross=0.2,self=0.4",
    "rw=4",
    "rw=4,self=0.4",
]
KINDS = ("colour", "shape", "background", "pattern")


def parse_setting(text: str) -> dict:
    setting = dict(REFERENCE)
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in REFERENCE:
            raise ValueError(f"--settings: unknown key {key!r} in {text!r}; keys: {', '.join(REFERENCE)}")
        if value in WORDS.get(key, ()):
            setting[key] = value
        elif key in ("edit", "inv", "neg"):
            raise ValueError(f"--settings: {key} must be one of {WORDS[key]}, got {value!r} in {text!r}")
        else:
            setting[key] = float(value)
    return setting


def attention_control(setting: dict, pairs) -> PromptToPrompt:
    words = [evaluate.blend_words(e) for e in pairs]
    level = None if setting["level"] == "auto" else int(setting["level"])
    blend = LocalBlend(
        [evaluate.object_words(e) for e in pairs] if setting["keep"] else words,
        threshold=setting["th"],
        start=setting["start"],
        map_level=level,
        keep=bool(setting["keep"]),
        stop=setting["stop"],
    )
    reweight = None if setting["rw"] == 1 else [dict.fromkeys(target, setting["rw"]) for _, target in words]
    edit_type = None if setting["edit"] == "auto" else setting["edit"]
    return PromptToPrompt(
        setting["cross"],
        setting["self"],
        edit_type=edit_type,
        reweight=reweight,
        local_blend=blend if setting["blend"] else None,
    )


def proximal_guidance(setting: dict) -> ProximalGuidance | bool:
    if not setting["prox"]:
        return False
    return ProximalGuidance("soft", quantile=setting["prox"], inversion_guidance=bool(setting["ig"]))


def edit_arguments(setting: dict, pairs) -> dict:
    """The pipeline call's editing arguments under ``setting`` (all but the prompts and the inversion)."""
    return dict(
        guidance_scale=setting["g"],
        guidance_rescale=setting["phi"],
        attention_control=attention_control(setting, pairs),
        proximal_guidance=proximal_guidance(setting),
        inversion_method=setting["inv"],
        negative_prompt=[e.source_caption for e in pairs] if setting["neg"] == "source" else None,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(evaluate.MODEL_DIR))
    p.add_argument("--res", type=int, default=evaluate.MODEL_RES)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS, help="edit kinds to keep")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="key=value[,key=value…] (see above)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid", type=int, default=8, help="pairs in OUT/p2p_settings.png (0: none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/toy_v2"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="the pipeline's dtype (float32, as the committed sweeps; pie_bench.py runs float16 on a GPU)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {text or "reference": parse_setting(text) for text in args.settings}  # parse all before any work

    pipe = evaluate.load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    pairs = [e for e in evaluate.make_pairs(args.pairs, seed=args.seed, res=args.res) if e.kind in args.kinds]
    with torch.no_grad():
        inversion = pipe.invert(
            [e.source_image for e in pairs],
            [e.source_caption for e in pairs],
            num_inference_steps=args.steps,
            inversion_method="npi",
        )
    results, examples = {}, {}
    for name, setting in settings.items():
        start = time.time()
        with torch.no_grad():
            images = pipe(
                prompt=[e.target_caption for e in pairs],
                inversion=inversion,
                output_type="pt",
                **edit_arguments(setting, pairs),
            ).images
        images = images.float().cpu()
        rows = [
            dict(
                kind=edit.kind,
                unedited_psnr=evaluate.psnr(image, edit.source_image, ~edit.mask[None]),
                attribute_ok=evaluate.attribute_ok(image, edit),
                objects_kept=evaluate.objects_kept(image, edit),
            )
            for image, edit in zip(images, pairs)
        ]
        results[name] = dict(setting=setting, rows=rows)
        examples[name] = images[: args.grid]
        print(f"[{time.time() - start:5.0f}s] {name}: {json.dumps(summary(rows))}", flush=True)
        write(Path(args.out), args, results, pairs, examples)  # after every setting: a long sweep may be cut short
    print(markdown(results, args))


def write(out_dir: Path, args, results: dict, pairs, examples: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "p2p_settings.json").write_text(evaluate.compact_json(dict(args=vars(args), results=results)))
    (out_dir / "p2p_settings.md").write_text(markdown(results, args))
    if args.grid:
        evaluate.example_grid(pairs, {"images": examples}, count=args.grid).save(out_dir / "p2p_settings.png")


def summary(rows) -> dict:
    mean = statistics.mean
    s = {key: mean(float(r[key]) for r in rows) for key in ("unedited_psnr", "attribute_ok", "objects_kept")}
    s["attribute_ok_by_kind"] = {
        kind: mean(float(r["attribute_ok"]) for r in rows if r["kind"] == kind)
        for kind in KINDS
        if any(r["kind"] == kind for r in rows)
    }
    return s


def markdown(results, args) -> str:
    model = Path(args.model).resolve()
    model = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model
    pairs = len(next(iter(results.values()))["rows"])
    lines = [
        f"`{model}`, {pairs} pairs ({', '.join(args.kinds)}), {args.steps} steps, {args.dtype}, "
        "NPI inversion edited as NPI "
        "(`inv=npi`) or Direct Inversion (`inv=direct`) + P2P with `LocalBlend` on the changed words (`keep=1`: "
        "all but where the objects' words attend); unnamed settings keep the references' values "
        f"({', '.join(f'{k}={v}' for k, v in REFERENCE.items())}).",
        "",
        "| setting | unedited PSNR | attribute acc. | objects kept | " + " | ".join(KINDS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(KINDS),
    ]
    for name, r in results.items():
        s = summary(r["rows"])
        by_kind = [f"{s['attribute_ok_by_kind'][k]:.0%}" if k in s["attribute_ok_by_kind"] else "–" for k in KINDS]
        lines.append(
            f"| {name} | {s['unedited_psnr']:.2f} dB | {s['attribute_ok']:.0%} | {s['objects_kept']:.0%} | "
            + " | ".join(by_kind)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
