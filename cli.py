"""``npi-edit``: invert and edit real images from the command line, one image or a whole manifest.

    npi-edit invert cat.png --prompt "a cat sitting on a wall" --out cat.safetensors
    npi-edit edit cat.safetensors --prompt "a dog sitting on a wall" --p2p --blend cat dog --out dog.png
    npi-edit batch PIE-Bench/mapping_file.json --out runs/p2p --p2p
    accelerate launch -m negative_prompt_inversion batch PIE-Bench/mapping_file.json --out runs/p2p --p2p
    npi-edit evaluate runs/p2p

``batch`` is resumable and safe to shard: the manifest is cut into batches of ``--batch-size`` consecutive items,
batch ``b`` runs on process ``b % num_processes``, and each process appends one line per finished item to its own
``results.<rank>.jsonl`` (flushed and fsynced). A batch is the unit of work: the pipeline rounds differently for
different batch compositions (up to float rounding, see the README), so a batch holding any unfinished item is
recomputed whole, which makes every output byte-identical whatever the number of processes and however often the
run was interrupted; only the unfinished items are written again.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from .pie_bench import Item, background_metrics, load_image, load_mask, read_manifest
from .pipeline_negative_prompt_inversion import (
    LocalBlend,
    MasaCtrl,
    NegativePromptInversionPipeline,
    PromptToPrompt,
)


# The embedded toy model, shipped inside this package (the one place the product refers to the toy world).
MODEL_DIR = Path(__file__).resolve().parent / "toy_world" / "model_v2"

DTYPES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------ manifests


def load_item(item: Item, check_blend: bool = True) -> torch.Tensor:
    """The item's image as [3, H, W] in [0, 1]; raises with a message naming the problem (bad row, missing or
    unreadable image, blend word not in its prompt (with ``check_blend``), mask of the wrong size)."""
    if item.problem:
        raise ValueError(item.problem)
    if not item.image.is_file():
        raise FileNotFoundError(f"no image file {item.image}")
    try:
        image = load_image(item.image)
    except Exception as error:
        raise ValueError(f"unreadable image {item.image}: {error}") from error
    if check_blend and item.blend is not None:
        for word, prompt in [(item.blend[0], item.source_prompt)] + [(item.blend[1], p) for p in item.target_prompts]:
            if not re.search(rf"\b{re.escape(word)}\b", prompt):
                raise ValueError(f"blend word {word!r} is not in the prompt {prompt!r}")
    load_mask(item, tuple(image.shape[-2:]))  # a bad mask is the item's error now, not at evaluation
    return image


# ------------------------------------------------------------------------------------------------- pipeline


def load_pipeline(args) -> NegativePromptInversionPipeline:
    """The pipeline of ``--model`` in ``--dtype`` on ``--device``, progress bars off."""
    model = Path(args.model)
    if not model.is_dir() and (model.is_absolute() or args.model.startswith(".") or args.model.count("/") != 1):
        raise SystemExit(f"--model: no diffusers folder {args.model} (and not a Hub id 'owner/name')")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}  # the toy folder stores fp16
    pipe = NegativePromptInversionPipeline.from_pretrained(args.model, **kwargs).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.compile and pipe.device.type == "cuda":  # inductor's convolutions run fastest channels-last there
        pipe.unet.to(memory_format=torch.channels_last)
    if args.cuda_graphs or args.compile:
        pipe.enable_cuda_graphs(compile=args.compile)  # CUDA only; CPU tensors run eagerly
    return pipe


def edit_kwargs(args, blend_words=None) -> dict:
    """The technique objects of the edit flags; ``blend_words`` as `LocalBlend` takes them."""
    kwargs = {"guidance_scale": args.guidance}
    if args.p2p:
        local_blend = LocalBlend(blend_words) if blend_words is not None else None
        kwargs["attention_control"] = PromptToPrompt(args.cross_replace, args.self_replace, local_blend=local_blend)
    elif args.masactrl:
        kwargs["attention_control"] = MasaCtrl()
    if args.proximal:
        kwargs["proximal_guidance"] = args.proximal
    return kwargs


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ single images


def invert_command(args) -> None:
    if not Path(args.image).is_file():
        raise SystemExit(f"IMAGE: no file {args.image}")
    try:
        image = Image.open(args.image)
        image.load()
    except Exception as error:  # PIL raises several kinds for a bad file
        raise SystemExit(f"IMAGE: cannot read {args.image}: {error}") from error
    pipe = load_pipeline(args)
    inversion = pipe.invert(image, args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                            inversion_method=args.method)
    inversion.save(args.out)
    print(f"inverted {args.image} ({inversion.method}, {args.steps} steps) -> {args.out}")


def edit_command(args) -> None:
    if not Path(args.inversion).is_file():
        raise SystemExit(f"INVERSION: no file {args.inversion}")
    if args.blend and not args.p2p:
        raise SystemExit("--blend is prompt-to-prompt's local blend: add --p2p")
    pipe = load_pipeline(args)
    inversion = pipe.load_inversion(args.inversion)
    blend = [(args.blend[0],), (args.blend[1],)] if args.blend else None
    image = pipe(prompt=args.prompt, inversion=inversion, **edit_kwargs(args, blend)).images[0]
    image.save(args.out)
    print(f"edited {args.inversion} toward {args.prompt or 'its source prompt'!r} -> {args.out}")


# -------------------------------------------------------------------------------------------------- batch


def shard_records(out: Path):
    """Every record of every process's ``results.<rank>.jsonl``, in file order."""
    for shard in sorted(glob.glob(str(out / "results.*.jsonl"))):
        with open(shard) as handle:
            for line in handle:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    continue


def finished_items(out: Path) -> dict[str, dict]:
    """Items some shard records as ok whose output files still have the recorded sha256, by id."""
    return {
        record["id"]: record for record in shard_records(out) if record["status"] == "ok" and all(
            (out / name).is_file() and sha256(out / name) == digest for name, digest in record["sha256"].items())
    }


def output_names(item: Item) -> tuple[str, list[str]]:
    """The inversion file and edited images of an item, relative to the output folder."""
    stem = re.sub(r"[^\w.-]", "_", item.id)
    edits = [f"edits/{stem}.png"] if len(item.target_prompts) == 1 else [
        f"edits/{stem}_{k}.png" for k in range(len(item.target_prompts))]
    return f"inversions/{stem}.safetensors", edits


def run_group(pipe, group: list[tuple[Item, torch.Tensor]], args, out: Path, write: set) -> list[dict]:
    """Invert and edit ``group`` in one call each; write the outputs of the items in ``write``."""
    items = [item for item, _ in group]
    start = time.perf_counter()
    inversion = pipe.invert([image for _, image in group], [item.source_prompt for item in items],
                            num_inference_steps=args.steps, guidance_scale=args.guidance, inversion_method=args.method)
    invert_seconds = (time.perf_counter() - start) / len(items)
    start = time.perf_counter()
    blend = None
    if args.p2p and items[0].blend is not None:
        blend = [((item.blend[0],), (item.blend[1],)) for item in items]  # one (source, target) pair per image
    prompt = None if args.reconstruct else [item.target_prompts for item in items]
    images = iter(pipe(prompt=prompt, inversion=inversion, **edit_kwargs(args, blend)).images)
    edit_seconds = (time.perf_counter() - start) / len(items)
    records = []
    for index, item in enumerate(items):
        inversion_name, edit_names = output_names(item)
        edits = [next(images) for _ in (edit_names[:1] if args.reconstruct else edit_names)]
        if item.id not in write:
            continue
        inversion[index].save(out / inversion_name)
        for image, name in zip(edits, edit_names):
            image.save(out / name)
        names = [inversion_name] + edit_names[: len(edits)]
        records.append({"id": item.id, "status": "ok", "error": None,
                        "outputs": {"inversion": inversion_name, "edits": names[1:]},
                        "sha256": {name: sha256(out / name) for name in names},
                        "seconds": {"invert": invert_seconds, "edit": edit_seconds}})
    return records


def error_record(item: Item, error: Exception) -> dict:
    return {"id": item.id, "status": "error", "error": f"{type(error).__name__}: {error}", "outputs": {},
            "sha256": {}, "seconds": {}}


def run_batch(pipe, batch: list[Item], args, out: Path, write: set):
    """Records of the items of ``batch`` in ``write``. Bad items become error records; items are called
    together (split by whether they have blend words, with --p2p), and one by one if a joint call fails."""
    loaded, groups = [], {}
    for item in batch:
        try:
            loaded.append((item, load_item(item, check_blend=args.p2p)))
        except Exception as error:  # noqa: BLE001 - any bad item is its own error line, never the batch's
            if item.id in write:
                yield error_record(item, error)
    for item, image in loaded:
        groups.setdefault(bool(args.p2p and item.blend), []).append((item, image))
    for group in groups.values():
        try:
            yield from run_group(pipe, group, args, out, write)
        except Exception:  # noqa: BLE001 - retried item by item below
            for member in group:  # deterministic fallback: the same on every run, so resumes stay exact
                try:
                    yield from run_group(pipe, [member], args, out, write)
                except Exception as error:  # noqa: BLE001
                    if member[0].id in write:
                        yield error_record(member[0], error)


def open_shard(path: Path):
    """This process's results file, for appending; a line cut by a crash is ended first, so it stays one bad line."""
    handle = open(path, "a+")  # noqa: SIM115 - the caller's `with` closes it
    if handle.tell() > 0:
        handle.seek(handle.tell() - 1)
        if handle.read(1) != "\n":
            handle.write("\n")
    return handle


def append_line(handle, record: dict) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


# Settings that change a batch's output bytes: a folder holds the outputs of one combination of them.
OUTPUT_SETTINGS = ("manifest", "images", "model", "method", "dtype", "steps", "guidance", "batch_size", "reconstruct",
                   "p2p", "masactrl", "cross_replace", "self_replace", "proximal")


def check_settings(out: Path, args, is_main_process: bool) -> None:
    """Refuse to resume a folder made with other output settings; record them (``batch.json``) for resumes and
    ``evaluate``."""
    settings = {name: getattr(args, name) for name in OUTPUT_SETTINGS}
    settings["manifest"] = str(Path(args.manifest).resolve())
    settings["images"] = str(Path(args.images).resolve()) if args.images else None
    recorded = out / "batch.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        changed = [name for name in OUTPUT_SETTINGS if before.get(name) != settings[name]]
        if changed:
            raise SystemExit(f"--out {out} holds a batch made with other settings ({', '.join(changed)});"
                             " use a new folder, or the same settings to resume it")
    elif is_main_process:
        tmp = out / "batch.json.tmp"
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, recorded)  # other processes read it whole or not at all


def batch_command(args) -> None:
    """Run this process's share of the manifest's batches, skipping finished items; rank 0 then merges the
    shards into ``results.jsonl`` and prints a summary."""
    # on a machine without CUDA, processes started by torchrun (accelerate launch) share work only when cpu=True
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    items = read_manifest(args.manifest, args.images)
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"MANIFEST: duplicate ids in {args.manifest}")
    out = Path(args.out)
    for folder in (out, out / "edits", out / "inversions"):
        folder.mkdir(parents=True, exist_ok=True)
    check_settings(out, args, state.is_main_process)
    done = finished_items(out)
    batches = [items[first : first + args.batch_size] for first in range(0, len(items), args.batch_size)]
    mine = [batch for b, batch in enumerate(batches) if b % state.num_processes == state.process_index]
    todo = [[item for item in batch if item.id not in done] for batch in mine]
    if args.device in (None, "cuda"):  # one GPU per process
        args.device = str(state.device)
    pipe = load_pipeline(args) if any(todo) else None
    with open_shard(out / f"results.{state.process_index}.jsonl") as handle, tqdm(
        total=sum(map(len, todo)), desc=f"process {state.process_index}", position=state.process_index
    ) as progress:
        for batch, write in zip(mine, todo):
            if write:
                for record in run_batch(pipe, batch, args, out, {item.id for item in write}):
                    append_line(handle, record)
                    progress.update()
    state.wait_for_everyone()
    if state.is_main_process:
        summarise_batch(items, out)


def summarise_batch(items: list[Item], out: Path) -> None:
    """Merge the shards into ``results.jsonl`` (manifest order, the newest record of each item) and print a
    summary."""
    latest = {record["id"]: record for record in shard_records(out)}
    latest.update(finished_items(out))  # an item with intact outputs is ok, whatever came after
    records = [latest[item.id] for item in items if item.id in latest]
    tmp = out / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, out / "results.jsonl")
    errors = [record for record in records if record["status"] != "ok"]
    print(f"{len(records) - len(errors)} ok, {len(errors)} errors, {len(items) - len(records)} missing"
          f" of {len(items)} items -> {out / 'results.jsonl'}")
    for record in errors:
        print(f"  {record['id']}: {record['error']}")


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate_command(args) -> None:
    out = Path(args.dir)
    if not (out / "batch.json").is_file():
        raise SystemExit(f"DIR: {out} has no batch.json; run `npi-edit batch ... --out {out}` first")
    settings = json.loads((out / "batch.json").read_text())
    manifest = Path(settings["manifest"])
    items = {item.id: item for item in read_manifest(manifest, settings.get("images"))}
    rows = []
    for record in finished_items(out).values():
        if record["id"] not in items:  # the manifest file was edited since the batch ran
            continue
        source = load_image(items[record["id"]].image)
        mask = load_mask(items[record["id"]], tuple(source.shape[-2:]))
        for name in record["outputs"]["edits"]:
            edited = load_image(out / name)
            if edited.shape != source.shape:  # the pipeline resized the input to the model's size
                print(f"  {name}: not evaluated, {tuple(edited.shape[1:])} px against a {tuple(source.shape[1:])} px source")
                continue
            row = {"id": record["id"], "edit": name}
            row.update({f"background_{k}": v for k, v in background_metrics(source, edited, mask).items()})
            rows.append(row)
    means = {key: _mean([row[key] for row in rows]) for key in (rows[0] if rows else {}) if key not in ("id", "edit")}
    (out / "metrics.json").write_text(json.dumps({"count": len(rows), "mean": means, "items": rows}, indent=1))
    print(f"{len(rows)} edits evaluated -> {out / 'metrics.json'}")
    print("| metric | mean |\n|---|---:|")
    for key, value in means.items():
        print(f"| {key} | {value:.4f} |")


def _mean(values) -> float:
    values = [float(v) for v in values if not math.isnan(float(v))]
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------------------------- arguments


def add_model_options(parser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=str(MODEL_DIR),
                       help="a local diffusers folder (or a Hub id, with network); default: the embedded toy model")
    group.add_argument("--method", choices=("npi", "nti", "ddim", "direct"), default="npi", help="inversion method")
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype")
    group.add_argument("--steps", type=int, default=50, help="DDIM steps (edits use the inversion's)")
    group.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    group.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    group.add_argument("--cuda-graphs", action="store_true", help="replay the UNet as CUDA graphs (CUDA only)")
    group.add_argument("--compile", action="store_true", help="also torch.compile the UNet (implies --cuda-graphs)")
    group.add_argument("--seed", type=int, default=0, help="torch seed (inversion and editing are deterministic)")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_edit_options(parser) -> None:
    group = parser.add_argument_group("editing technique")
    control = group.add_mutually_exclusive_group()
    control.add_argument("--p2p", action="store_true", help="prompt-to-prompt attention control")
    control.add_argument("--masactrl", action="store_true", help="MasaCtrl mutual self-attention")
    group.add_argument("--cross-replace", type=float, default=0.4, help="P2P cross-attention window (fraction)")
    group.add_argument("--self-replace", type=float, default=0.6, help="P2P self-attention window (fraction)")
    group.add_argument("--proximal", choices=("soft", "hard"), default=None, help="proximal guidance mode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npi-edit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Invert and edit real images (negative-prompt / null-text / DDIM inversion with prompt-to-prompt,"
                    " MasaCtrl and proximal guidance).",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    invert = commands.add_parser("invert", help="invert one image into an inversion file")
    invert.add_argument("image", help="the image to invert")
    invert.add_argument("--prompt", required=True, help="the source prompt describing the image")
    invert.add_argument("--out", required=True, help="the inversion file to write (.safetensors)")
    add_model_options(invert)
    invert.set_defaults(func=invert_command)

    edit = commands.add_parser("edit", help="edit (or reconstruct) an inverted image")
    edit.add_argument("inversion", help="an inversion file written by `npi-edit invert`")
    edit.add_argument("--prompt", default=None, help="the target prompt (default: reconstruct the source)")
    edit.add_argument("--blend", nargs=2, metavar=("SRC", "TGT"), help="P2P local blend: a source and a target word")
    edit.add_argument("--out", required=True, help="the edited image to write (.png)")
    add_model_options(edit)
    add_edit_options(edit)
    edit.set_defaults(func=edit_command)

    batch = commands.add_parser(
        "batch", help="invert and edit every item of a manifest (resumable, shardable)",
        description="Invert and edit every item of a manifest. Rerun the same command to resume: items whose outputs"
                    " are intact are skipped. Shard over processes with `accelerate launch -m negative_prompt_inversion"
                    " batch ...`; the outputs are the same bytes as a single process's.")
    batch.add_argument("manifest", help="a PIE-Bench mapping_file.json, or a .jsonl / .csv manifest")
    batch.add_argument("--images", default=None, help="folder of the manifest's images (default: beside it)")
    batch.add_argument("--out", required=True, help="output folder (edits/, inversions/, results*.jsonl)")
    batch.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    batch.add_argument("--reconstruct", action="store_true", help="reconstruct the images instead of editing them")
    add_model_options(batch)
    add_edit_options(batch)
    batch.set_defaults(func=batch_command)

    evaluate = commands.add_parser("evaluate", help="PIE-Bench background metrics of a finished batch")
    evaluate.add_argument("dir", help="the --out folder of `npi-edit batch`")
    evaluate.set_defaults(func=evaluate_command)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        raise SystemExit("--batch-size must be at least 1")
    if args.command in ("invert", "edit"):
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
