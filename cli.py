"""``npi-edit``: invert and edit real images from the command line, one image or a whole manifest.

    npi-edit invert cat.png --prompt "a cat sitting on a wall" --out cat.safetensors
    npi-edit edit cat.safetensors --prompt "a dog sitting on a wall" --p2p --blend cat dog --out dog.png
    npi-edit batch PIE-Bench/mapping_file.json --out runs/p2p --p2p
    accelerate launch -m negative_prompt_inversion batch PIE-Bench/mapping_file.json --out runs/p2p --p2p
    npi-edit evaluate runs/p2p

Every mistake a user can make is found before any model runs and reported as one line naming the argument (exit
status 2); ``--debug`` shows the traceback of any failure. Heavy modules (torch, diffusers, transformers,
accelerate) are imported only when a command runs, so ``--help`` and argument errors answer at once.

``batch`` is resumable and safe to shard: the manifest is cut into batches of ``--batch-size`` consecutive items,
batch ``b`` runs on process ``b % num_processes``, and each process appends one line per finished item to its own
``results.<rank>.jsonl`` (flushed and fsynced). A batch is the unit of work: the pipeline rounds differently for
different batch compositions (up to float rounding, see the README), so a batch holding any unfinished item is
recomputed whole, which makes every output byte-identical whatever the number of processes and however often the
run was interrupted; only the unfinished items are written again. Each record carries the key of everything its
outputs depend on (the settings, the model's files, the code and library versions, and the content of every row
and image of its batch): a record whose key no longer matches is not done, so an edited row or a replaced image
is recomputed with its batch, and a folder refuses to resume with other settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import unicodedata
from pathlib import Path


# The embedded toy model of a checkout (the one place the product refers to the toy world; not in the wheel).
MODEL_DIR = Path(__file__).resolve().parent / "toy_world" / "model_v2"

DTYPES = ("float32", "float16", "bfloat16")
INVERSION_METHODS = ("npi", "nti", "ddim", "direct")  # the pipeline's, without importing it (a test checks)
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """A user mistake, reported as one line (exit status 2)."""


# ------------------------------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is enough
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, high: float = math.inf):
    """An argparse type: a finite ``kind`` in [low, high]."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (math.isfinite(value) and low <= value <= high):
            bounds = f"at least {low}" if high == math.inf else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return convert


def add_model_options(parser, inversion: bool) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=str(MODEL_DIR),
        help="a local diffusers folder (or a Hub id, with network); default: the embedded toy model",
    )
    if inversion:
        group.add_argument(
            "--method",
            choices=INVERSION_METHODS,
            default="direct",
            help="inversion method (default: direct, Direct Inversion)",
        )
        group.add_argument("--steps", type=_number(int, 1), default=50, help="DDIM steps")
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype")
    group.add_argument(
        "--guidance",
        type=_number(float, 0),
        default=None,
        help="classifier-free guidance scale of the edits (default 7.5); null-text inversion"
        " (--method nti) is fitted to it"
        if inversion
        else "classifier-free guidance scale (default: the one the inversion was made for)",
    )
    group.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    group.add_argument("--cuda-graphs", action="store_true", help="replay the UNet as CUDA graphs (CUDA only)")
    group.add_argument("--compile", action="store_true", help="also torch.compile the UNet (CUDA only)")
    group.add_argument(
        "--seed",
        type=_number(int, 0, 2**63 - 1),
        default=0,
        help="torch seed (inversion and editing are deterministic)",
    )
    group.add_argument("--threads", type=_number(int, 1), default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any failure")


def add_edit_options(parser) -> None:
    group = parser.add_argument_group("editing technique")
    control = group.add_mutually_exclusive_group()
    control.add_argument("--p2p", action="store_true", help="prompt-to-prompt attention control")
    control.add_argument("--masactrl", action="store_true", help="MasaCtrl mutual self-attention")
    group.add_argument(
        "--cross-replace",
        type=_number(float, 0, 1),
        default=None,
        help="P2P cross-attention window, a fraction of the steps (default 0.4)",
    )
    group.add_argument(
        "--self-replace",
        type=_number(float, 0, 1),
        default=None,
        help="P2P self-attention window, a fraction of the steps (default 0.6)",
    )
    group.add_argument("--proximal", choices=("soft", "hard"), default=None, help="proximal guidance mode")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="npi-edit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Invert and edit real images (negative-prompt / null-text / DDIM inversion with prompt-to-prompt,"
        " MasaCtrl and proximal guidance).",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    invert = commands.add_parser("invert", help="invert one image into an inversion file")
    invert.add_argument("image", help="the image to invert")
    invert.add_argument("--prompt", required=True, help="the source prompt describing the image")
    invert.add_argument("--out", required=True, help="the inversion file to write (.safetensors)")
    add_model_options(invert, inversion=True)
    invert.set_defaults(func=invert_command)

    edit = commands.add_parser(
        "edit",
        help="edit (or reconstruct) an inverted image",
        description="Edit an inverted image toward --prompt (or reconstruct it). The step count and the inversion"
        " method are the inversion file's.",
    )
    edit.add_argument("inversion", help="an inversion file written by `npi-edit invert`")
    edit.add_argument("--prompt", default=None, help="the target prompt (default: reconstruct the source)")
    blends = edit.add_mutually_exclusive_group()
    blends.add_argument("--blend", nargs=2, metavar=("SRC", "TGT"), help="P2P local blend: a source and a target word")
    blends.add_argument(
        "--keep",
        nargs="+",
        metavar="WORD",
        help="P2P local blend for a background edit: keep what these words of both prompts cover (the objects) and"
        " edit the rest (LocalBlend.keeping)",
    )
    edit.add_argument("--out", required=True, help="the edited image to write (.png, .jpg, ...)")
    add_model_options(edit, inversion=False)
    add_edit_options(edit)
    edit.set_defaults(func=edit_command)

    batch = commands.add_parser(
        "batch",
        help="invert and edit every item of a manifest (resumable, shardable)",
        description="Invert and edit every item of a manifest. Rerun the same command to resume: items whose outputs"
        " are intact and up to date are skipped, items whose row or image changed are recomputed. Shard"
        " over processes with `accelerate launch -m negative_prompt_inversion batch ...`; the outputs are"
        " the same bytes as a single process's.",
    )
    batch.add_argument("manifest", help="a PIE-Bench mapping_file.json, or a .jsonl / .csv manifest")
    batch.add_argument("--images", default=None, help="folder of the manifest's images (default: beside it)")
    batch.add_argument("--out", required=True, help="output folder (edits/, inversions/, results*.jsonl)")
    batch.add_argument("--batch-size", type=_number(int, 1), default=4, help="images per pipeline call")
    batch.add_argument("--reconstruct", action="store_true", help="reconstruct the images instead of editing them")
    add_model_options(batch, inversion=True)
    add_edit_options(batch)
    batch.set_defaults(func=batch_command)

    evaluate = commands.add_parser(
        "evaluate",
        help="PIE-Bench background metrics of a finished batch, per edit kind",
        description="Score the edits of a `npi-edit batch` folder as PIE-Bench's evaluation does, per edit kind,"
        " and write DIR/metrics.json.",
    )
    evaluate.add_argument("dir", help="the --out folder of `npi-edit batch`")
    evaluate.add_argument("--debug", action="store_true", help="show the traceback of any failure")
    evaluate.set_defaults(func=evaluate_command)
    return parser


def main(argv=None) -> None:
    """Run one command. Success returns; a failure prints one line and raises `SystemExit` with a non-zero status
    (2: a usage mistake, 1: the command failed or left items unfinished, 130: interrupted)."""
    args = build_parser().parse_args(argv)
    prog = f"npi-edit {args.command}"
    logging.getLogger("transformers.utils.import_utils").addFilter(_no_torchvision_notice)
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'' if args.command == 'evaluate' else '; nothing written'}", file=sys.stderr)
        status = EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure is one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        status = EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
    if status:
        raise SystemExit(status)


def _no_torchvision_notice(record) -> bool:
    """transformers' notice that torchvision is missing concerns image processors this tool never uses."""
    return "torchvision" not in str(record.msg)


def _one_line(error: Exception) -> str:
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    if isinstance(error, (UsageError, ValueError, OSError)):
        return text
    return f"{type(error).__name__}: {text} (--debug shows the traceback)"


# ------------------------------------------------------------------------------------------ settings checks


def check_technique_flags(args, editing: bool) -> None:
    """Flags that would have no effect are mistakes, not silently ignored."""
    p2p_flags = [
        flag
        for flag, value in (
            ("--cross-replace", args.cross_replace),
            ("--self-replace", args.self_replace),
            ("--blend", getattr(args, "blend", None)),
            ("--keep", getattr(args, "keep", None)),
        )
        if value is not None
    ]
    if p2p_flags and not args.p2p:
        raise UsageError(f"{p2p_flags[0]} is a prompt-to-prompt setting: add --p2p")
    if not editing:
        technique = next(
            (
                flag
                for flag, on in (("--p2p", args.p2p), ("--masactrl", args.masactrl), ("--proximal", args.proximal))
                if on
            ),
            None,
        )
        if technique:
            what = (
                "--reconstruct regenerates the source"
                if hasattr(args, "reconstruct")
                else "without --prompt, edit reconstructs the source"
            )
            raise UsageError(f"{technique} changes edits only, and {what}: drop it, or give a target prompt")


def check_model_folder(args) -> None:
    """``--model`` is a diffusers folder or a Hub id; ``--steps`` fits a local folder's noise schedule."""
    model = Path(args.model)
    if args.model == str(MODEL_DIR) and not model.is_dir():
        raise UsageError(
            "--model: give a diffusers folder (SD 1.x/2.x or SDXL); the embedded toy model, the default,"
            " ships with a checkout of the repository, not with the installed package"
        )
    if not model.is_dir():
        if model.is_absolute() or args.model.startswith(".") or args.model.count("/") != 1 or model.exists():
            raise UsageError(f"--model: no diffusers folder {args.model} (and not a Hub id 'owner/name')")
        return
    if not (model / "model_index.json").is_file():
        raise UsageError(f"--model: {args.model} is not a diffusers folder (no model_index.json)")
    try:
        scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        scheduler = {}
    train_steps = scheduler.get("num_train_timesteps", 1000)
    if getattr(args, "steps", None) is not None and args.steps > train_steps:
        raise UsageError(f"--steps: at most the model's {train_steps} training timesteps, got {args.steps}")


def resolve_device(args) -> str:
    """``--device`` as a torch device name this machine has; ``--cuda-graphs`` / ``--compile`` need CUDA."""
    import torch

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {name!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    available = {
        "cpu": lambda: True,
        "cuda": lambda: torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if device.type not in available:
        raise UsageError(f"--device: {name!r} cannot run the pipeline here; use cpu, cuda or mps")
    if not available[device.type]():
        raise UsageError(f"--device: no {name} device on this machine (torch {torch.__version__})")
    if (args.cuda_graphs or args.compile) and device.type != "cuda":
        flag = "--compile" if args.compile else "--cuda-graphs"
        raise UsageError(f"{flag} needs a CUDA device, and --device is {name}")
    return name


def check_guidance(args, method: str | None) -> None:
    """The pipeline's own guidance rule (bounds, null-text inversion's w >= 1) before any model loads."""
    from .pipeline_negative_prompt_inversion import _check_guidance

    if args.guidance is not None:
        try:
            _check_guidance(args.guidance, method)
        except ValueError as error:
            raise UsageError(f"--guidance: {error}") from None


def check_output_file(path: str, suffixes: tuple[str, ...], what: str) -> Path:
    """``--out`` names a file this process can write, in an existing folder, with a suffix it can be written as."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--out: {path} is a folder; give {what}")
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"--out: {path} is not {what}")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"--out: no folder {folder}" if not folder.exists() else f"--out: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out: cannot write {path} (read-only)")
    return out


def check_output_folder(path: str) -> Path:
    """``--out`` is a folder this process can create (with its parents) or write in."""
    out = Path(path)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out: {existing} is a file, not a folder")
    folders = [out / "edits", out / "inversions", out] if out.exists() else [existing]
    for folder in folders:
        if folder.exists() and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise UsageError(f"--out: cannot write in {folder} (read-only, or not a folder)")
    return out


def image_suffixes() -> tuple[str, ...]:
    """The usual RGB image formats this Pillow writes."""
    from PIL import Image

    formats = Image.registered_extensions()
    return tuple(
        suffix
        for suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
        if formats.get(suffix) in Image.SAVE
    )


# ------------------------------------------------------------------------------------------------- pipeline


def load_pipeline(args, device: str, progress: str | None = None):
    """The pipeline of ``--model`` in ``--dtype`` on ``device``, its progress bars labelled ``progress`` (or off)."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .pipeline_negative_prompt_inversion import NegativePromptInversionPipeline

    apply_threads(args)
    torch.manual_seed(args.seed)
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()  # loading bars: noise next to the run's own
    dtype = getattr(torch, args.dtype)
    kwargs = {} if dtype == torch.float32 else {"dtype": dtype}  # the toy folder stores fp16
    pipe = NegativePromptInversionPipeline.from_pretrained(args.model, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=progress is None, desc=progress, leave=False)
    if args.compile:  # inductor's convolutions run fastest channels-last on CUDA
        pipe.unet.to(memory_format=torch.channels_last)
    if args.cuda_graphs or args.compile:
        pipe.enable_cuda_graphs(compile=args.compile)
    return pipe


def apply_threads(args) -> int:
    """Set ``--threads``; the number torch uses (it changes CPU output bytes, so batches record it)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def resolve_defaults(args, guidance: float | None = 7.5) -> None:
    """Defaults that depend on other flags, filled in once the flags are checked (so batches record what ran)."""
    if args.guidance is None:
        args.guidance = guidance
    if getattr(args, "p2p", False):
        args.cross_replace = 0.4 if args.cross_replace is None else args.cross_replace
        args.self_replace = 0.6 if args.self_replace is None else args.self_replace


def edit_kwargs(args, local_blend=None) -> dict:
    """The technique objects of the edit flags, prompt-to-prompt's with ``local_blend``."""
    from .pipeline_negative_prompt_inversion import MasaCtrl, PromptToPrompt

    kwargs = {}
    if args.p2p:
        kwargs["attention_control"] = PromptToPrompt(args.cross_replace, args.self_replace, local_blend=local_blend)
    elif args.masactrl:
        kwargs["attention_control"] = MasaCtrl()
    if args.proximal:
        kwargs["proximal_guidance"] = args.proximal
    return kwargs


def blend_problem(tokenizer, source: str, targets: list[str], blend) -> str | None:
    """Why ``blend`` = (source word, target word) cannot select words of these prompts, or None. Asks the pipeline's
    own word matching, so the CLI accepts exactly what the pipeline does."""
    from .attention_processors.npi_prompt_to_prompt import find_word

    for word, prompt, role in [(blend[0], source, "source")] + [(blend[1], t, "target") for t in targets]:
        try:
            if not find_word(prompt, word, tokenizer):
                return f"blend word {word!r} is not in the {role} prompt {prompt!r}"
        except ValueError as error:
            return str(error)
    return None


# ------------------------------------------------------------------------------------------ single images


def invert_command(args) -> None:
    from .pipeline_negative_prompt_inversion import INVERSION_METHODS as methods
    from .pipeline_negative_prompt_inversion import _image_to_tensor

    if args.guidance is not None and not methods[args.method].optimises_null_text:
        raise UsageError(
            f"--guidance: {args.method} inverts at guidance 1 whatever the edit's guidance; give"
            " --guidance to `edit` (only null-text inversion, --method nti, is fitted to one)"
        )
    resolve_defaults(args)
    check_guidance(args, args.method)
    check_model_folder(args)
    device = resolve_device(args)
    out = check_output_file(args.out, (".safetensors",), "an inversion file (.safetensors)")
    if not Path(args.image).is_file():
        raise UsageError(f"IMAGE: no file {args.image}")
    try:
        image = _image_to_tensor(args.image)
    except ValueError as error:
        raise UsageError(f"IMAGE: {error}") from None
    pipe = load_pipeline(args, device, progress=f"inverting ({args.method})")
    inversion = pipe.invert(
        image, args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, inversion_method=args.method
    )
    write_atomically(out, inversion.save)
    print(f"inverted {args.image} ({inversion.method}, {args.steps} steps) -> {out}")


def edit_command(args) -> None:
    from .pipeline_negative_prompt_inversion import InversionResult, LocalBlend

    check_technique_flags(args, editing=args.prompt is not None)
    check_model_folder(args)
    device = resolve_device(args)
    out = check_output_file(args.out, image_suffixes(), f"an image file ({', '.join(image_suffixes())})")
    if not Path(args.inversion).is_file():
        raise UsageError(f"INVERSION: no file {args.inversion}")
    try:
        inversion = InversionResult.load(args.inversion)
    except ValueError as error:
        raise UsageError(f"INVERSION: {error}") from None
    if args.guidance is not None and args.guidance != inversion.guidance_scale and inversion.null_embeds is not None:
        print(
            f"note: this null-text inversion was fitted to guidance {inversion.guidance_scale:g}; at"
            f" {args.guidance:g} it no longer reconstructs the source exactly",
            file=sys.stderr,
        )
    resolve_defaults(args, guidance=inversion.guidance_scale)
    check_guidance(args, inversion.method)
    pipe = load_pipeline(args, device, progress="editing" if args.prompt else "reconstructing")
    try:
        inversion = pipe.check_inversion(inversion)  # made by this model?
    except ValueError as error:
        raise UsageError(f"INVERSION: {error}") from None
    blend = None
    if args.blend:
        problem = blend_problem(pipe.tokenizer, inversion.source_prompts[0], [args.prompt], args.blend)
        if problem:
            raise UsageError(f"--blend: {problem}")
        blend = LocalBlend([(args.blend[0],), (args.blend[1],)])
    if args.keep:
        for word in args.keep:
            problem = blend_problem(pipe.tokenizer, inversion.source_prompts[0], [args.prompt], (word, word))
            if problem:
                raise UsageError(f"--keep: {problem}")
        blend = LocalBlend.keeping(args.keep)
    image = pipe(
        prompt=args.prompt, inversion=inversion, guidance_scale=args.guidance, **edit_kwargs(args, blend)
    ).images[0]
    write_atomically(out, lambda path: image.save(path, format=image_format(out)))
    print(f"edited {args.inversion} toward {args.prompt or 'its source prompt'!r} -> {out}")


def image_format(path: Path) -> str:
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def write_atomically(path: Path, write) -> None:
    """``write(temporary path)``, then rename it to ``path``: a crash or a full disk never leaves half a file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- batch


_SHA256 = {}  # (path, size, mtime) -> digest: a resume checks every output, and the summary checks them again


def sha256(path) -> str:
    """The file's SHA-256; files already hashed by this process with the same size and mtime are not read again."""
    stat = os.stat(path)
    identity = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if identity not in _SHA256:
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
        _SHA256[identity] = hasher.hexdigest()
    return _SHA256[identity]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def output_names(item) -> tuple[str, list[str]]:
    """The inversion file and edited images of an item, relative to the output folder."""
    stem = re.sub(r"[^\w.-]", "_", item.id)
    edits = (
        [f"edits/{stem}.png"]
        if len(item.target_prompts) == 1
        else [f"edits/{stem}_{k}.png" for k in range(len(item.target_prompts))]
    )
    return f"inversions/{stem}.safetensors", edits


def check_ids(items, manifest: str) -> None:
    """Every item writes files no other item writes, on any file system (case-insensitive ones too)."""
    owners = {}
    for item in items:
        inversion, edits = output_names(item)
        if len(Path(inversion).name.encode()) > 240:
            raise UsageError(f"{manifest}:{item.line}: id {item.id[:40]!r}... is too long for a file name")
        for name in [inversion, *edits]:
            key = unicodedata.normalize("NFC", name).casefold()
            other = owners.setdefault(key, item)
            if other is item:
                continue
            if other.id == item.id:
                raise UsageError(f"{manifest}:{item.line}: id {item.id!r} is already the id of line {other.line}")
            raise UsageError(
                f"{manifest}:{item.line}: id {item.id!r} would write {name}, as id {other.id!r} (line {other.line})"
                " does; ids must stay distinct with characters other than letters, digits, '.', '-', '_' as '_'"
                " and ignoring case"
            )


def model_fingerprint(model: str) -> dict:
    """What identifies ``--model``'s weights, cheaply: every file's size, small files whole and large ones by 64
    strided 4 KiB samples. A Hub id is resolved to its local snapshot (batches never download)."""
    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache, whatever the reason
            raise UsageError(
                f"--model: {model} is not in the local Hugging Face cache; download it first"
                f" (huggingface-cli download {model})"
            ) from None
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts) or path.suffix == ".md":
            continue
        size = path.stat().st_size
        hasher = hashlib.sha256()
        with open(path, "rb") as handle:
            if size <= 1 << 20:
                hasher.update(handle.read())
            else:
                for k in range(64):
                    handle.seek(k * (size - 4096) // 63)
                    hasher.update(handle.read(4096))
        files[relative.as_posix()] = f"{size}:{hasher.hexdigest()[:16]}"
    return {"files": digest(files)}


def code_fingerprint() -> str:
    """The pipeline's code: any change to it may change outputs."""
    root = Path(__file__).resolve().parent
    paths = [root / "pipeline_negative_prompt_inversion.py", *sorted((root / "attention_processors").glob("*.py"))]
    return digest({path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths})


# Arguments that cannot change an output byte; every other one is recorded, so a new flag is recorded by default.
NOT_OUTPUT_SETTINGS = {"command", "func", "debug", "out", "device"}


def output_settings(args, threads: int, device: str) -> dict:
    """Everything besides the manifest's rows that determines a batch's output bytes."""
    import diffusers
    import torch
    import transformers

    settings = {name: value for name, value in sorted(vars(args).items()) if name not in NOT_OUTPUT_SETTINGS}
    settings.update(
        manifest=str(Path(args.manifest).resolve()),
        images=str(Path(args.images).resolve()) if args.images else None,
        model=str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model,
        model_files=model_fingerprint(args.model)["files"],
        threads=threads,
        device=torch.cuda.get_device_name(device)
        if torch.device(device).type == "cuda"
        else torch.device(device).type,
        code=code_fingerprint(),
        versions={
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    )
    return settings


def check_settings(out: Path, settings: dict, is_main_process: bool) -> None:
    """Refuse to resume a folder made with other output settings; record them (``batch.json``) for resumes and
    ``evaluate``."""
    recorded = out / "batch.json"
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except ValueError:
            raise UsageError(f"--out: {recorded} is damaged; use a new folder") from None
        changed = [name for name in settings if before.get(name) != settings[name]]
        if changed:
            hints = {
                "threads": "pass --threads {}",
                "code": "this folder was made by another version of the pipeline",
                "model_files": "the model folder's files changed",
            }
            details = [
                f"{name}: {before.get(name)!r} then, {settings[name]!r} now"
                if name not in hints
                else hints[name].format(before.get(name))
                for name in changed[:3]
            ]
            raise UsageError(
                f"--out: {out} holds a batch made with other settings ({'; '.join(details)}); use a new"
                " folder, or the same settings to resume it"
            )
    elif is_main_process:
        write_atomically(recorded, lambda path: path.write_text(json.dumps(settings, indent=1)))


def item_keys(items, settings: dict, batch_size: int) -> tuple[dict[str, str], dict[str, str]]:
    """Per item: the digest of its row and image (``row``), and of everything its outputs depend on (``key``): the
    settings and every row of its batch, in order (the batch's composition changes the rounding)."""
    rows = {item.id: row_digest(item) for item in items}
    settings_digest = digest(settings)
    keys = {}
    for first in range(0, len(items), batch_size):
        batch = items[first : first + batch_size]
        key = digest({"settings": settings_digest, "batch": [rows[item.id] for item in batch]})
        keys.update({item.id: digest([key, item.id]) for item in batch})
    return rows, keys


def row_digest(item) -> str:
    """The digest of an item's manifest row and image file's bytes."""
    return digest({"row": item.entry, "image": sha256(item.image) if item.image.is_file() else None})


def shard_records(out: Path):
    """Every record of every process's ``results.<rank>.jsonl``, in file order."""
    for shard in sorted(out.glob("results.*.jsonl")):
        with open(shard) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    yield record


def intact(out: Path, record: dict) -> bool:
    """The record is ``ok`` and its output files still have the recorded SHA-256."""
    files = record.get("sha256") or {}
    return (
        record.get("status") == "ok"
        and bool(files)
        and all((out / name).is_file() and sha256(out / name) == value for name, value in files.items())
    )


def finished_items(out: Path, keys: dict[str, str] | None = None) -> dict[str, dict]:
    """By id: the newest record of each item that is ok, has intact outputs, and (given ``keys``) the item's key."""
    return {
        record["id"]: record
        for record in shard_records(out)
        if (keys is None or record.get("key") == keys.get(record["id"])) and intact(out, record)
    }


class ItemError(Exception):
    """Why one item cannot run; recorded in its result line while the batch goes on."""


def load_item(item, pipe, args):
    """The item's image as [3, H, W] in [0, 1], or `ItemError` naming the problem: a missing or unreadable image, a
    blend word not in its prompts (with --p2p), a mask of the wrong size."""
    from .pie_bench import load_image, load_mask

    if not item.image.is_file():
        raise ItemError(f"no image file {item.image}")
    try:
        image = load_image(item.image)
        if args.p2p and item.blend is not None and not args.reconstruct:
            problem = blend_problem(pipe.tokenizer, item.source_prompt, item.target_prompts, item.blend)
            if problem:
                raise ItemError(problem)
        load_mask(item, tuple(image.shape[-2:]))  # a bad mask is the item's error now, not at evaluation
    except (ValueError, OSError) as error:
        raise ItemError(str(error)) from None
    return image


def run_group(pipe, group: list, args, out: Path, write: dict) -> list[dict]:
    """Invert and edit ``group`` ([(item, image)]) in one call each; write the outputs of the items in ``write``
    ({id: (row digest, key)}) and return their records."""
    from .pipeline_negative_prompt_inversion import LocalBlend

    items = [item for item, _ in group]
    start = time.perf_counter()
    inversion = pipe.invert(
        [image for _, image in group],
        [item.source_prompt for item in items],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        inversion_method=args.method,
    )
    invert_seconds = time.perf_counter() - start
    start = time.perf_counter()
    blend = None
    if args.p2p and items[0].blend is not None:
        blend = [((item.blend[0],), (item.blend[1],)) for item in items]  # one (source, target) pair per image
    prompt = None if args.reconstruct else [item.target_prompts for item in items]
    images = iter(
        pipe(
            prompt=prompt,
            inversion=inversion,
            guidance_scale=args.guidance,
            **edit_kwargs(args, None if blend is None else LocalBlend(blend)),
        ).images
    )
    timing = {
        "items_in_call": len(items),
        "invert_seconds": invert_seconds,
        "edit_seconds": time.perf_counter() - start,
    }
    records = []
    for index, item in enumerate(items):
        inversion_name, edit_names = output_names(item)
        edits = [next(images) for _ in (edit_names[:1] if args.reconstruct else edit_names)]
        if item.id not in write:
            continue
        names = [inversion_name] + edit_names[: len(edits)]
        write_output(out / inversion_name, inversion[index].save)
        for image, name in zip(edits, edit_names):
            write_output(out / name, lambda path, image=image: image.save(path, format="PNG"))
        row, key = write[item.id]
        records.append(
            {
                "id": item.id,
                "status": "ok",
                "error": None,
                "row": row,
                "key": key,
                "outputs": {"inversion": inversion_name, "edits": names[1:]},
                "sha256": {name: sha256(out / name) for name in names},
                "timing": timing,
            }
        )
    return records


class OutputError(Exception):
    """An output could not be written (a full disk, a read-only folder): the run cannot go on."""


def write_output(path: Path, write) -> None:
    try:
        write_atomically(path, write)
    except OSError as error:
        raise OutputError(f"could not write {path} ({error.strerror or error})") from error


def error_record(item, error: Exception, write: dict) -> dict:
    row, key = write[item.id]
    return {
        "id": item.id,
        "status": "error",
        "error": str(error),
        "row": row,
        "key": key,
        "outputs": {},
        "sha256": {},
        "timing": None,
    }


def run_batch(pipe, batch: list, args, out: Path, write: dict):
    """Records of the items of ``batch`` in ``write``. Bad items become error records; the others are called
    together (split by whether they have blend words, with --p2p), and one by one if a joint call fails."""
    groups = {}
    for item in batch:
        try:
            image = load_item(item, pipe, args)
        except ItemError as error:
            if item.id in write:
                yield error_record(item, error, write)
            continue
        groups.setdefault(bool(args.p2p and item.blend), []).append((item, image))
    for group in groups.values():
        try:
            yield from run_group(pipe, group, args, out, write)
        except (OutputError, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - retried item by item below
            for member in group:  # deterministic fallback: the same on every run, so resumes stay exact
                try:
                    yield from run_group(pipe, [member], args, out, write)
                except (OutputError, KeyboardInterrupt):
                    raise
                except Exception as error:  # noqa: BLE001
                    if member[0].id in write:
                        yield error_record(member[0], ItemError(_one_line(error)), write)


def open_shard(path: Path):
    """This process's results file, for appending, locked against a second run in the same folder; a line cut by
    a crash is ended first, so it stays one bad line."""
    handle = open(path, "a+")  # noqa: SIM115 - the caller's `with` closes it
    try:
        import fcntl  # POSIX; elsewhere two runs in one folder go unnoticed
    except ImportError:
        fcntl = None
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(
            f"--out: another npi-edit batch is writing {path}; wait for it, or use another folder"
        ) from None
    if handle.tell() > 0:
        handle.seek(handle.tell() - 1)
        if handle.read(1) != "\n":
            handle.write("\n")
    return handle


def append_line(handle, record: dict) -> None:
    try:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as error:
        raise OutputError(f"could not append to {handle.name} ({error.strerror or error})") from error


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def batch_command(args) -> int:
    """Run this process's share of the manifest's batches, skipping finished items; rank 0 then merges the
    shards into ``results.jsonl`` and prints a summary. Returns the exit status: 0 only if every item is done."""
    from .pie_bench import ManifestError, read_manifest

    check_technique_flags(args, editing=not args.reconstruct)
    resolve_defaults(args)
    check_guidance(args, args.method)
    check_model_folder(args)
    out = check_output_folder(args.out)
    if args.images is not None and not Path(args.images).is_dir():
        raise UsageError(f"--images: no folder {args.images}")
    try:
        items = read_manifest(args.manifest, args.images)
    except ManifestError as error:
        raise UsageError(f"MANIFEST: {error}") from None
    check_ids(items, args.manifest)
    if not any(item.image.is_file() for item in items):
        raise UsageError(
            f"MANIFEST: none of its {len(items)} images exists (the first would be {items[0].image});"
            " give their folder with --images"
        )
    device = resolve_device(args)

    import torch
    from accelerate import PartialState

    # on a machine without CUDA, processes started by torchrun (accelerate launch) share work only when cpu=True
    state = PartialState(cpu=torch.device(device).type == "cpu")
    if args.device in (None, "cuda") and device.startswith("cuda"):  # one GPU per process
        device = str(state.device)
    settings = output_settings(args, apply_threads(args), device)
    rows, keys = item_keys(items, settings, args.batch_size)
    for folder in (out / "edits", out / "inversions"):
        folder.mkdir(parents=True, exist_ok=True)
    with open_shard(out / f"results.{state.process_index}.jsonl") as shard:
        check_settings(out, settings, state.is_main_process)
        done = finished_items(out, keys)
        if state.is_main_process:
            report_resume(items, out, done, rows)
        batches = [items[first : first + args.batch_size] for first in range(0, len(items), args.batch_size)]
        mine = [batch for b, batch in enumerate(batches) if b % state.num_processes == state.process_index]
        todo = [{item.id: (rows[item.id], keys[item.id]) for item in batch if item.id not in done} for batch in mine]
        try:
            if any(todo):
                run_share(args, device, shard, state, mine, todo)
        except KeyboardInterrupt:
            finished = len(finished_items(out, keys))
            print(
                f"\ninterrupted: {finished} of {len(items)} items done; run the same command again to resume",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        except OutputError as error:
            missing = [item.id for item in items if item.id not in finished_items(out, keys)]
            print(
                f"npi-edit batch: error: {error}; {len(missing)} of {len(items)} items missing"
                f" ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); free the space and run the same"
                " command again to resume",
                file=sys.stderr,
            )
            return EXIT_FAILED
    state.wait_for_everyone()
    return summarise_batch(items, out, keys) if state.is_main_process else 0


def run_share(args, device, shard, state, mine, todo) -> None:
    """Run this process's batches, appending to its ``shard``, with a progress bar of its items (those done by
    earlier runs included)."""
    from tqdm.auto import tqdm

    pipe = load_pipeline(args, device)
    total = sum(map(len, mine))
    with tqdm(
        total=total,
        initial=total - sum(map(len, todo)),
        unit="item",
        position=state.process_index,
        desc="items" if state.num_processes == 1 else f"process {state.process_index}",
        dynamic_ncols=True,
    ) as progress:
        for batch, write in zip(mine, todo):
            if write:
                for record in run_batch(pipe, batch, args, Path(args.out), write):
                    append_line(shard, record)
                    progress.update()


def report_resume(items, out: Path, done: dict, rows: dict) -> None:
    """Say what a rerun skips and what it recomputes because it changed."""
    latest = {record["id"]: record for record in shard_records(out)}
    if not latest:
        return
    stale = [item for item in items if item.id not in done and latest.get(item.id, {}).get("status") == "ok"]
    changed = [item for item in stale if latest[item.id].get("row") != rows[item.id]]
    failed = [item for item in items if latest.get(item.id, {}).get("status") == "error"]
    parts = [f"{len(done)} of {len(items)} items already done, skipped"]
    if changed:
        parts.append(
            f"{plural(len(changed), 'item')} changed since written (row or image: "
            f"{', '.join(item.id for item in changed[:3])}{', ...' if len(changed) > 3 else ''}), recomputed"
        )
    if len(stale) > len(changed):
        parts.append(
            f"{len(stale) - len(changed)} more recomputed (a row of their batch changed, or an output file"
            " is damaged or gone)"
        )
    if failed:
        parts.append(f"{len(failed)} failed last time, retried")
    print("; ".join(parts), file=sys.stderr)


def summarise_batch(items, out: Path, keys: dict) -> int:
    """Merge the shards into ``results.jsonl`` (manifest order, the newest record of each item) and print a summary
    naming every item that is not done. Returns the exit status."""
    latest = {record["id"]: record for record in shard_records(out) if record.get("key") == keys.get(record["id"])}
    latest.update(finished_items(out, keys))  # an item with intact outputs is ok, whatever came after
    records = [latest[item.id] for item in items if item.id in latest]
    try:
        write_atomically(
            out / "results.jsonl",
            lambda path: path.write_text("".join(json.dumps(record) + "\n" for record in records)),
        )
    except OSError as error:
        print(f"npi-edit batch: error: could not write {out / 'results.jsonl'} ({error.strerror})", file=sys.stderr)
        return EXIT_FAILED
    errors = [record for record in records if record["status"] != "ok"]
    missing = len(items) - len(records)
    print(
        f"{len(records) - len(errors)} ok, {len(errors)} errors, {missing} missing of {len(items)} items"
        f" -> {out / 'results.jsonl'}"
    )
    for record in errors:
        print(f"  {record['id']}: {record['error']}")
    return EXIT_FAILED if errors or missing else 0


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate_command(args) -> None:
    from .pie_bench import BACKGROUND_COLUMNS

    evaluate_folder(args.dir, columns=BACKGROUND_COLUMNS)


def evaluate_folder(folder, columns, extra=None, metrics_file: str = "metrics.json") -> dict:
    """Score every finished, up-to-date edit of a batch folder; print a per-edit-kind table of ``columns``
    (`pie_bench.Column`) with its legend, and write ``metrics_file``. ``extra(item, edited)`` adds columns of its
    own (the toy world's exact metrics, for one)."""
    from .pie_bench import ManifestError, background_metrics, kind_table, load_image, load_mask, read_manifest

    out = Path(folder)
    if not (out / "batch.json").is_file():
        raise UsageError(f"DIR: {out} has no batch.json; run `npi-edit batch ... --out {out}` first")
    settings = json.loads((out / "batch.json").read_text())
    try:
        items = {item.id: item for item in read_manifest(settings["manifest"], settings.get("images"))}
    except ManifestError as error:
        raise UsageError(f"the batch's manifest: {error}") from None
    rows, skipped = [], []
    for record in finished_items(out).values():
        item = items.get(record["id"])
        if item is None or record.get("row") != row_digest(item):
            skipped.append(record["id"])  # the row changed since the edit: it no longer scores what it shows
            continue
        source = load_image(item.image)
        mask = load_mask(item, tuple(source.shape[-2:]))
        for name in record["outputs"]["edits"]:
            edited = load_image(out / name)
            if edited.shape != source.shape:  # the pipeline resized the input to the model's size
                skipped.append(f"{name} ({tuple(edited.shape[1:])} px against a {tuple(source.shape[1:])} px source)")
                continue
            row = {"id": record["id"], "edit": name, "kind": item.editing_type}
            row.update({f"background_{k}": v for k, v in background_metrics(source, edited, mask).items()})
            row.update(extra(item, edited) if extra else {})
            rows.append(row)
    table, summary = kind_table(rows, columns)
    metrics = {"count": len(rows), "by_kind": summary, "items": rows}
    (out / metrics_file).write_text(json.dumps(metrics, indent=1))
    if skipped:
        print(
            f"not evaluated: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}"
            " (rows changed since the batch ran: rerun it; or edits of another size than their source)"
        )
    print(f"{len(rows)} edits evaluated -> {out / metrics_file}\n\n{table}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
