"""The ``npi-edit`` command line on a tiny model folder (conftest's components saved as a diffusers folder; CPU, 3
steps): single images, batches over a PIE-Bench folder and a JSONL manifest, resume, two processes, evaluate; every
user mistake as one line before any model loads; what a batch must never do (mix outputs, lose them silently).

Every run uses one torch thread, so the in-process runs and the launched processes compute alike; outputs are
compared byte for byte (same batch composition, see cli.py), timings never.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, scene_image
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from negative_prompt_inversion import cli, pie_bench


STEPS = ["--steps", "3"]
RUN = ["--threads", "1", "--device", "cpu"]
BATCH = ["--batch-size", "2", "--p2p", *STEPS, *RUN]
# One PIE-Bench entry per edit kind; PIE-Bench brackets the changed words and gives one blend word per side.
ENTRIES = {
    "100000000000": ("1", "a red [cat] on a white background", "a red [dog] on a white background", "cat dog"),
    "600000000001": (
        "6",
        "a [green] square on a black background",
        "a [blue] square on a black background",
        "green blue",
    ),
    "800000000002": (
        "8",
        "a red circle on a [white] background",
        "a red circle on a [black] background",
        "white black",
    ),
    "100000000003": ("1", "a big [cat] sitting on a wall", "a big [dog] sitting on a wall", "cat dog"),
}


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(components, tmp_path_factory) -> str:
    """The tiny test model as a diffusers folder, as `StableDiffusionPipeline.save_pretrained` writes it."""
    folder = tmp_path_factory.mktemp("tiny-sd") / "model"
    StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pie(tmp_path_factory) -> Path:
    """A PIE-Bench folder: mapping_file.json and annotation_images/, a centre-square mask per entry."""
    folder = tmp_path_factory.mktemp("pie")
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    mapping = {}
    for index, (key, (kind, source, target, blend)) in enumerate(ENTRIES.items()):
        path = f"{kind}_{pie_bench.EDITING_TYPES[kind]}/{key}.png"
        (folder / "annotation_images" / path).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(scene_image(index)).save(folder / "annotation_images" / path)
        mapping[key] = {
            "image_path": path,
            "original_prompt": source,
            "editing_prompt": target,
            "editing_instruction": "",
            "editing_type_id": kind,
            "blended_word": blend,
            "mask": pie_bench.encode_mask(mask),
        }
    (folder / "mapping_file.json").write_text(json.dumps(mapping, indent=1))
    return folder / "mapping_file.json"


@pytest.fixture(scope="module")
def finished(pie, model, tmp_path_factory) -> Path:
    """A finished single-process batch over the PIE-Bench folder."""
    out = tmp_path_factory.mktemp("single") / "out"
    cli.main(["batch", str(pie), "--out", str(out), "--model", model, *BATCH])
    return out


@pytest.fixture(scope="module")
def checkout_env(tmp_path_factory) -> dict:
    """Environment of a fresh interpreter that imports this checkout as the package, whatever an editable install
    points at."""
    package = tmp_path_factory.mktemp("site")
    (package / "negative_prompt_inversion").symlink_to(ROOT, target_is_directory=True)
    return dict(os.environ, PYTHONPATH=str(package), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def output_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*")) if p.is_file()}


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def row(image, source="a red cat on a white background", target="a red dog on a white background", **fields):
    return {"image": str(image), "source_prompt": source, "target_prompt": target, **fields}


def fails(capsys, argv, status: int = 2) -> str:
    """Run ``npi-edit argv``; it must exit with ``status`` after one line on stderr and no traceback."""
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == status, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and "%|" not in line]  # progress bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def no_model(monkeypatch):
    """Any model load fails the test: the mistake must be found before."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "load_pipeline", load)


# ================================================================================================ --help


def test_help_is_quiet_and_imports_no_heavy_module(checkout_env):
    """`--help` of the tool and of every command: no torch, diffusers, transformers, accelerate, nothing on stderr."""
    code = (
        "import sys\n"
        "from negative_prompt_inversion import cli\n"
        "for argv in ([], ['invert'], ['edit'], ['batch'], ['evaluate']):\n"
        "    try:\n"
        "        cli.main([*argv, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'numpy', 'PIL') if m in sys.modules]\n"
        "print('heavy:', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=checkout_env,
        cwd=ROOT.parent,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "heavy: []" in done.stdout and done.stdout.count("usage: npi-edit") == 5


# ================================================================================================ single images


def invert_the_cat(pie, model, folder: Path, *options) -> Path:
    """`npi-edit invert` of the PIE folder's cat ("a red cat on a white background") into folder/inv.safetensors."""
    image = next(pie.parent.glob("annotation_images/1_*/100000000000.png"))
    inversion = folder / "inv.safetensors"
    prompt = "a red cat on a white background"
    cli.main(
        ["invert", str(image), "--prompt", prompt, "--out", str(inversion), *options, "--model", model, *STEPS, *RUN]
    )
    return inversion


def test_invert_then_edit_one_image(pie, model, tmp_path, capsys):
    inversion = invert_the_cat(pie, model, tmp_path, "--method", "ddim")
    assert json.loads(safe_open(inversion, "pt").metadata()["inversion"])["method"] == "ddim"
    assert "inverting (ddim)" in capsys.readouterr().err  # the progress bar
    edited = tmp_path / "edited.png"
    cli.main(
        [
            "edit",
            str(inversion),
            "--prompt",
            "a red dog on a white background",
            "--p2p",
            "--blend",
            "cat",
            "dog",
            "--proximal",
            "soft",
            "--out",
            str(edited),
            "--model",
            model,
            *RUN,
        ]
    )
    assert PIL.Image.open(edited).size == (32, 32)
    assert "editing" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*partial"))  # written through a temporary file, renamed


def test_a_blend_word_not_in_the_prompt_is_one_line(pie, model, tmp_path, capsys):
    """Found by the pipeline's own word matching, after the model loads but before any UNet pass."""
    inversion = invert_the_cat(pie, model, tmp_path)
    line = fails(
        capsys,
        [
            "edit",
            str(inversion),
            "--prompt",
            "a red dog on a white background",
            "--p2p",
            "--blend",
            "cat",
            "tiger",
            "--out",
            str(tmp_path / "e.png"),
            "--model",
            model,
            *RUN,
        ],
    )
    assert line.startswith("npi-edit edit: error: --blend:") and "'tiger'" in line
    assert not (tmp_path / "e.png").exists()
    background = ["edit", str(inversion), "--prompt", "a red cat on a black background", "--p2p", "--model", model]
    line = fails(capsys, [*background, "--keep", "red", "white", "--out", str(tmp_path / "e.png"), *RUN])
    assert line.startswith("npi-edit edit: error: --keep:") and "'white' is not in the target prompt" in line
    cli.main([*background, "--keep", "red", "cat", "--out", str(tmp_path / "kept.png"), *RUN])
    assert PIL.Image.open(tmp_path / "kept.png").size == (32, 32)


# Each case: arguments (paths from `paths`), a fragment of the one-line message. None found after a model loads.
MISTAKES = {
    "steps 0": (["invert", "{image}", "--prompt", "p", "--out", "{dir}/i.safetensors", "--steps", "0"], "--steps"),
    "steps word": (["batch", "{pie}", "--out", "{dir}/o", "--steps", "many"], "--steps: expected an integer"),
    "steps above the schedule": (
        ["invert", "{image}", "--prompt", "p", "--out", "{dir}/i.safetensors", "--steps", "5000"],
        "--steps: at most the model's 1000",
    ),
    "guidance nan": (["batch", "{pie}", "--out", "{dir}/o", "--guidance", "nan"], "--guidance"),
    "guidance inf": (["edit", "{inversion}", "--out", "{dir}/e.png", "--guidance", "inf"], "--guidance"),
    "guidance above the pipeline's bound": (
        ["batch", "{pie}", "--out", "{dir}/o", "--guidance", "1e6"],
        "--guidance: guidance_scale must lie in",
    ),
    "nti guidance below 1": (
        ["invert", "{image}", "--prompt", "p", "--out", "{dir}/i.safetensors", "--method", "nti", "--guidance", "0.5"],
        "--guidance: guidance_scale must be >= 1",
    ),
    "guidance the default inversion ignores": (
        ["invert", "{image}", "--prompt", "p", "--out", "{dir}/i.safetensors", "--guidance", "5"],
        "--guidance: direct inverts at guidance 1",
    ),
    "cross-replace 1.5": (
        ["batch", "{pie}", "--out", "{dir}/o", "--p2p", "--cross-replace", "1.5"],
        "--cross-replace: must be in [0, 1]",
    ),
    "cross-replace without p2p": (
        ["edit", "{inversion}", "--prompt", "p", "--out", "{dir}/e.png", "--cross-replace", "0.5"],
        "--cross-replace is a prompt-to-prompt setting",
    ),
    "blend without p2p": (
        ["edit", "{inversion}", "--prompt", "p", "--blend", "a", "b", "--out", "{dir}/e.png"],
        "--blend is a prompt-to-prompt setting",
    ),
    "keep without p2p": (
        ["edit", "{inversion}", "--prompt", "p", "--keep", "a", "--out", "{dir}/e.png"],
        "--keep is a prompt-to-prompt setting",
    ),
    "blend and keep": (
        ["edit", "{inversion}", "--prompt", "p", "--p2p", "--blend", "a", "b", "--keep", "c", "--out", "{dir}/e.png"],
        "--keep: not allowed with argument --blend",
    ),
    "p2p without a prompt": (["edit", "{inversion}", "--p2p", "--out", "{dir}/e.png"], "--p2p changes edits only"),
    "reconstruct with p2p": (
        ["batch", "{pie}", "--out", "{dir}/o", "--reconstruct", "--p2p"],
        "--p2p changes edits only",
    ),
    "edit steps (the inversion's)": (
        ["edit", "{inversion}", "--steps", "20", "--out", "{dir}/e.png"],
        "unrecognized arguments: --steps 20",
    ),
    "batch size 0": (["batch", "{pie}", "--out", "{dir}/o", "--batch-size", "0"], "--batch-size: must be at least 1"),
    "threads 0": (["batch", "{pie}", "--out", "{dir}/o", "--threads", "0"], "--threads"),
    "seed -1": (["batch", "{pie}", "--out", "{dir}/o", "--seed", "-1"], "--seed"),
    "method": (["batch", "{pie}", "--out", "{dir}/o", "--method", "magic"], "--method: invalid choice"),
    "device bogus": (["batch", "{pie}", "--out", "{dir}/o", "--device", "bogus"], "--device: 'bogus' is not"),
    "device meta": (
        ["invert", "{image}", "--prompt", "p", "--out", "{dir}/i.safetensors", "--device", "meta"],
        "--device: 'meta' cannot run",
    ),
    "device cuda:99": (
        ["edit", "{inversion}", "--out", "{dir}/e.png", "--device", "cuda:99"],
        "--device: no cuda:99 device",
    ),
    "cuda graphs on cpu": (
        ["batch", "{pie}", "--out", "{dir}/o", "--device", "cpu", "--cuda-graphs"],
        "--cuda-graphs needs a CUDA device",
    ),
    "compile on cpu": (
        ["edit", "{inversion}", "--out", "{dir}/e.png", "--device", "cpu", "--compile"],
        "--compile needs a CUDA device",
    ),
    "model missing": (["batch", "{pie}", "--out", "{dir}/o", "--model", "{dir}/nowhere"], "--model: no diffusers"),
    "model not a diffusers folder": (
        ["edit", "{inversion}", "--out", "{dir}/e.png", "--model", "{dir}"],
        "no model_index.json",
    ),
    "image missing": (["invert", "{dir}/none.png", "--prompt", "p", "--out", "{dir}/i.safetensors"], "IMAGE: no file"),
    "image unreadable": (
        ["invert", "{text}", "--prompt", "p", "--out", "{dir}/i.safetensors"],
        "IMAGE: image: cannot read",
    ),
    "inversion missing": (["edit", "{dir}/none.safetensors", "--out", "{dir}/e.png"], "INVERSION: no file"),
    "inversion not an inversion": (["edit", "{inversion}", "--out", "{dir}/e.png"], "INVERSION:"),
    "invert out in a missing folder": (
        ["invert", "{image}", "--prompt", "p", "--out", "{dir}/no/i.safetensors"],
        "--out: no folder",
    ),
    "edit out in a missing folder": (["edit", "{inversion}", "--out", "{dir}/no/e.png"], "--out: no folder"),
    "invert out a folder": (["invert", "{image}", "--prompt", "p", "--out", "{dir}"], "is a folder"),
    "invert out not safetensors": (
        ["invert", "{image}", "--prompt", "p", "--out", "{dir}/i.png"],
        "is not an inversion file (.safetensors)",
    ),
    "edit out without an image suffix": (
        ["edit", "{inversion}", "--out", "{dir}/edited"],
        "--out: {dir}/edited is not an image file",
    ),
    "edit out under a file": (["edit", "{inversion}", "--out", "{text}/e.png"], "is not a folder"),
    "batch out an existing file": (["batch", "{pie}", "--out", "{text}"], "is a file, not a folder"),
    "batch out under a file": (["batch", "{pie}", "--out", "{text}/o"], "is a file, not a folder"),
    "manifest missing": (["batch", "{dir}/none.jsonl", "--out", "{dir}/o"], "no such file"),
    "manifest a folder": (["batch", "{dir}", "--out", "{dir}/o"], "a folder, not a manifest"),
    "images folder missing": (["batch", "{pie}", "--out", "{dir}/o", "--images", "{dir}/none"], "--images: no folder"),
    "manifest suffix": (["batch", "{text}", "--out", "{dir}/o"], "a manifest is a PIE-Bench mapping_file.json"),
    "evaluate a folder without a batch": (["evaluate", "{dir}"], "has no batch.json"),
}


@pytest.fixture()
def paths(pie, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    inversion = tmp_path / "fake.safetensors"
    inversion.write_bytes(b"\x00" * 16)
    return {
        "dir": str(tmp_path),
        "pie": str(pie),
        "text": str(text),
        "inversion": str(inversion),
        "image": str(next(pie.parent.glob("annotation_images/1_*/100000000000.png"))),
    }


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_before_any_model_loads(case, paths, model, no_model, capsys):
    argv, message = MISTAKES[case]
    argv = [arg.format(**paths) for arg in argv]
    if "--model" not in argv and argv[0] != "evaluate":
        argv += ["--model", model]
    line = fails(capsys, argv)
    assert message.format(**paths) in line, line
    assert not Path(paths["dir"], "o").exists()  # a batch with a bad flag creates nothing


def test_debug_shows_where_a_failure_came_from(paths, model, no_model):
    with pytest.raises(cli.UsageError, match="--device: .bogus. is not a torch device"):
        cli.main(
            ["batch", paths["pie"], "--out", paths["dir"] + "/o", "--device", "bogus", "--debug", "--model", model]
        )


def test_the_device_cuda_without_cuda_is_one_line(paths, model, no_model, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = fails(capsys, ["batch", paths["pie"], "--out", paths["dir"] + "/o", "--device", "cuda", "--model", model])
    assert "--device: no cuda device on this machine" in line


def test_a_read_only_output_is_one_line(paths, model, no_model, monkeypatch, capsys):
    """Read-only folders (and file systems) deny write access; as root only the latter do, so access is simulated."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode & os.W_OK else access(path, mode))
    for argv in (
        ["invert", paths["image"], "--prompt", "p", "--out", paths["dir"] + "/i.safetensors"],
        ["edit", paths["inversion"], "--out", paths["dir"] + "/e.png"],
        ["batch", paths["pie"], "--out", paths["dir"] + "/o"],
    ):
        assert "read-only" in fails(capsys, [*argv, "--model", model])


# ------------------------------------------------------------------------------------ manifests not what they claim

MANIFESTS = {
    "bad JSONL line": ("m.jsonl", ["{row}", "{{not json"], "m.jsonl:2: not valid JSON"),
    "JSONL row a list": ("m.jsonl", ["{row}", '["a.png", "a cat", "a dog"]'], "m.jsonl:2: a row is a JSON object"),
    "target_prompts a string": (
        "m.jsonl",
        ['{{"image": "a.png", "source_prompt": "a cat", "target_prompts": "a dog"}}'],
        "m.jsonl:1: 'target_prompts' must be a list",
    ),
    "JSONL row without image": (
        "m.jsonl",
        ["{row}", '{{"source_prompt": "a", "target_prompt": "b"}}'],
        "m.jsonl:2: no 'image'",
    ),
    "blend of one word": (
        "m.jsonl",
        ['{{"image": "a.png", "source_prompt": "a", "target_prompt": "b", "blend": "a"}}'],
        "m.jsonl:1: 'blend' must be",
    ),
    "mapping file a list": ("mapping_file.json", ['["a.png"]'], "mapping_file.json:1: a PIE-Bench mapping file is a"),
    "mapping entry without prompt": (
        "mapping_file.json",
        ["{{", '"1": {{"image_path": "a.png"}}', "}}"],
        "mapping_file.json:2: entry '1': no 'original_prompt'",
    ),
    "mapping with a repeated id": ("mapping_file.json", ['{{"1": {{}},', '"1": {{}}}}'], "key '1' appears twice"),
    "CSV without a column": ("m.csv", ["image,source_prompt", "a.png,a cat"], "m.csv:1: the header has no column"),
    "CSV row short": (
        "m.csv",
        ["image,source_prompt,target_prompt", "a.png,a cat,a dog", "b.png,a cat"],
        "m.csv:3: this row has fewer fields",
    ),
    "empty": ("m.jsonl", [""], "m.jsonl: no items"),
    "ids that share a file": (
        "m.jsonl",
        ['{{"id": "a/b", {fields}}}', '{{"id": "a_b", {fields}}}'],
        "m.jsonl:2: id 'a_b' would write inversions/a_b.safetensors, as id 'a/b' (line 1)",
    ),
    "ids that differ in case": (
        "m.jsonl",
        ['{{"id": "Cat", {fields}}}', '{{"id": "cat", {fields}}}'],
        "id 'cat' would write",
    ),
    "an id another item's target names": (
        "m.jsonl",
        [
            '{{"id": "x", "image": "a.png", "source_prompt": "a", "target_prompts": ["b", "c"]}}',
            '{{"id": "x_1", {fields}}}',
        ],
        "id 'x_1' would write edits/x_1.png, as id 'x'",
    ),
    "a misspelt field": (
        "m.jsonl",
        ['{{"image": "a.png", "source_prompt": "a", "target_prompt": "b", "blnd": "a b"}}'],
        "m.jsonl:1: unknown field 'blnd'; did you mean 'blend'?",
    ),
    "no image where the manifest says": ("m.jsonl", ["{row}"], "MANIFEST: none of its 1 images exists"),
    "duplicate ids": (
        "m.jsonl",
        ['{{"id": "a", {fields}}}', '{{"id": "a", {fields}}}'],
        "m.jsonl:2: id 'a' is already",
    ),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_manifest_that_is_not_what_it_claims_is_one_line_with_file_and_line(case, tmp_path, model, no_model, capsys):
    name, lines, message = MANIFESTS[case]
    fields = '"image": "a.png", "source_prompt": "a cat", "target_prompt": "a dog"'
    manifest = tmp_path / name
    manifest.write_text("\n".join(line.format(row=json.dumps(row("a.png")), fields=fields) for line in lines) + "\n")
    line = fails(capsys, ["batch", str(manifest), "--out", str(tmp_path / "o"), "--model", model])
    assert line.startswith("npi-edit batch: error:") and message in line, line
    assert not (tmp_path / "o").exists()


def test_csv_and_jsonl_manifests(tmp_path):
    (tmp_path / "m.csv").write_text("image,source_prompt,target_prompt,blend\ncat.png,a cat,a dog,cat dog\n")
    (item,) = pie_bench.read_manifest(tmp_path / "m.csv", images=str(tmp_path / "imgs"))
    assert (item.id, item.image, item.target_prompts, item.blend, item.line) == (
        "000000",
        tmp_path / "imgs" / "cat.png",
        ["a dog"],
        ("cat", "dog"),
        2,
    )
    rows = [row("a.png", id=7, target_prompt=None, target_prompts=["b", "c"], editing_type_id=6), "", row("b.png")]
    first, second = pie_bench.read_manifest(jsonl(tmp_path / "m.jsonl", rows))
    assert (first.id, first.target_prompts, first.editing_type, second.id, second.line) == (
        "7",
        ["b", "c"],
        "6",
        "000001",
        3,
    )


# ================================================================================================ batches


def test_batch_writes_every_output_and_line(pie, finished):
    lines = records(finished)
    assert [r["id"] for r in lines] == list(ENTRIES) and {r["status"] for r in lines} == {"ok"}
    for record in lines:
        assert set(record["sha256"]) == {record["outputs"]["inversion"], *record["outputs"]["edits"]}
        assert all((finished / name).is_file() for name in record["sha256"])
        # the seconds of the calls that made the item, and how many items shared them: no invented per-item split
        assert record["timing"]["items_in_call"] == 2 and record["timing"]["invert_seconds"] > 0
    settings = json.loads((finished / "batch.json").read_text())
    assert settings["threads"] == 1 and settings["dtype"] == "float32" and settings["model_files"]


def test_a_rerun_says_what_it_skipped_and_loads_no_model(pie, model, finished, no_model, capsys):
    before = output_files(finished)
    cli.main(["batch", str(pie), "--out", str(finished), "--model", model, *BATCH])
    captured = capsys.readouterr()
    assert "4 of 4 items already done, skipped" in captured.err and "4 ok, 0 errors, 0 missing" in captured.out
    assert output_files(finished) == before


def test_a_second_run_in_the_same_folder_is_refused(pie, model, finished, no_model, capsys):
    fcntl = pytest.importorskip("fcntl")
    with open(finished / "results.0.jsonl", "a") as running:
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = fails(capsys, ["batch", str(pie), "--out", str(finished), "--model", model, *BATCH])
    assert "another npi-edit batch is writing" in line


def test_bad_items_are_recorded_the_batch_goes_on_and_exits_non_zero(pie, model, tmp_path, capsys):
    image = next(pie.parent.glob("annotation_images/1_*/100000000000.png"))
    (tmp_path / "broken.png").write_text("not an image")
    PIL.Image.new("L", (8, 8)).save(tmp_path / "small_mask.png")
    PIL.Image.new("L", (32, 32)).save(tmp_path / "mask.png")
    manifest = jsonl(
        tmp_path / "manifest.jsonl",
        [
            row(image, id="good", blend="cat dog", mask="mask.png"),
            row("nowhere.png", id="missing"),
            row("broken.png", id="unreadable"),
            row(image, id="blend", blend="tiger dog"),
            row(image, id="mask", mask="small_mask.png"),
            row(
                image,
                id="two",
                target=None,
                target_prompts=["a red dog on a white background", "a blue cat on a white background"],
            ),
        ],
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        cli.main(["batch", str(manifest), "--out", str(out), "--model", model, *BATCH])
    assert exit.value.code == 1
    status = {r["id"]: (r["status"], r["error"]) for r in records(out)}
    assert status["good"][0] == status["two"][0] == "ok"
    assert "nowhere.png" in status["missing"][1] and "cannot read" in status["unreadable"][1]
    assert "'tiger'" in status["blend"][1] and "small_mask.png" in status["mask"][1]
    assert (out / "edits" / "two_0.png").is_file() and (out / "edits" / "two_1.png").is_file()
    summary = capsys.readouterr().out
    assert "2 ok, 4 errors" in summary and all(f"  {name}:" in summary for name in ("missing", "blend", "mask"))


def test_resume_recomputes_only_what_is_missing(finished, pie, model, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(finished, out)
    before = output_files(out)
    last = records(finished)[-1]
    (out / last["outputs"]["edits"][0]).unlink()
    shard = out / "results.0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-1]) + lines[-1][:40])  # the crash cut the last line
    cli.main(["batch", str(pie), "--out", str(out), "--model", model, *BATCH])
    new = [json.loads(line) for line in shard.read_text().splitlines()[len(lines) :]]
    assert [r["id"] for r in new] == [last["id"]]
    assert output_files(out) == before
    assert "3 of 4 items already done, skipped" in capsys.readouterr().err


def test_an_interrupted_run_resumed_with_an_edited_row_or_other_threads_never_mixes(pie, model, tmp_path, capsys):
    """An edited row is recomputed with its batch (the batch's composition changes the rounding) and reported; the
    folder then holds exactly what a fresh run over the edited manifest writes. Other threads are refused."""
    data = tmp_path / "data"
    shutil.copytree(pie.parent, data)
    manifest = data / "mapping_file.json"
    out = tmp_path / "out"
    cli.main(["batch", str(manifest), "--out", str(out), "--model", model, *BATCH])
    last = records(out)[-1]  # "interrupted" before the last item was written
    (out / last["outputs"]["edits"][0]).unlink()
    shard = out / "results.0.jsonl"
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[:-1]))
    mapping = json.loads(manifest.read_text())
    mapping["100000000000"]["editing_prompt"] = "a blue [cat] on a white background"
    mapping["100000000000"]["blended_word"] = "red blue"
    manifest.write_text(json.dumps(mapping))
    capsys.readouterr()

    before = output_files(out)
    line = fails(
        capsys,
        [
            "batch",
            str(manifest),
            "--out",
            str(out),
            "--model",
            model,
            *BATCH[:-4],
            "--threads",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert "other settings (pass --threads 1)" in line and output_files(out) == before

    cli.main(["batch", str(manifest), "--out", str(out), "--model", model, *BATCH])
    report = capsys.readouterr().err
    assert (
        "1 of 4 items already done" in report and "1 item changed since written (row or image: 100000000000)" in report
    )
    fresh = tmp_path / "fresh"
    cli.main(["batch", str(manifest), "--out", str(fresh), "--model", model, *BATCH])
    assert output_files(out) == output_files(fresh)
    assert [(r["id"], r["sha256"]) for r in records(out)] == [(r["id"], r["sha256"]) for r in records(fresh)]


def test_ctrl_c_prints_one_line_and_the_same_command_resumes(pie, model, finished, tmp_path, monkeypatch, capsys):
    run_group, calls = cli.run_group, []

    def interrupted_on_the_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_group(*args, **kwargs)

    monkeypatch.setattr(cli, "run_group", interrupted_on_the_second_call)
    out = tmp_path / "out"
    argv = ["batch", str(pie), "--out", str(out), "--model", model, *BATCH]
    line = fails(capsys, argv, status=130)
    assert line == "interrupted: 2 of 4 items done; run the same command again to resume"
    monkeypatch.setattr(cli, "run_group", run_group)
    cli.main(argv)
    assert output_files(out) == output_files(finished)


def test_a_full_disk_exits_non_zero_and_names_what_is_missing(pie, model, tmp_path, monkeypatch, capsys):
    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PIL.Image.Image, "save", full)
    out = tmp_path / "out"
    line = fails(capsys, ["batch", str(pie), "--out", str(out), "--model", model, *BATCH], status=1)
    assert "No space left on device" in line and "4 of 4 items missing (100000000000, 600000000001" in line
    assert not list(out.glob("*/.*partial")) and not records_of_shards(out)


def records_of_shards(out: Path) -> list:
    return [line for shard in out.glob("results.*.jsonl") for line in shard.read_text().splitlines()]


def test_two_processes_equal_one(pie, model, finished, tmp_path, checkout_env):
    out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "negative_prompt_inversion",
        "batch",
        str(pie),
        "--out",
        str(out),
        "--model",
        model,
        *BATCH,
    ]
    done = subprocess.run(
        command, env=checkout_env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("results.*.jsonl")) == ["results.0.jsonl", "results.1.jsonl"]
    assert output_files(out) == output_files(finished)
    assert [(r["id"], r["sha256"]) for r in records(out)] == [(r["id"], r["sha256"]) for r in records(finished)]


def test_batch_size_changes_outputs_only_by_rounding(pie, model, finished, tmp_path):
    """Batch size 1 against 2: the pipeline's kernels round differently per batch shape (README, "Batches")."""
    out = tmp_path / "one"
    cli.main(["batch", str(pie), "--out", str(out), "--model", model, *[a if a != "2" else "1" for a in BATCH]])
    for record in records(finished):
        inversion = record["outputs"]["inversion"]
        a, b = (load_file(folder / inversion)["latents"] for folder in (finished, out))
        eps = torch.finfo(torch.float32).eps
        assert (a - b).abs().max() <= 256 * eps * a.abs().max()  # 3 steps of float32 rounding, with margin
        for name in record["outputs"]["edits"]:
            x, y = (np.asarray(PIL.Image.open(folder / name), dtype=np.int16) for folder in (finished, out))
            # Rounding flips of the 8-bit output: values within the float difference of a half-level boundary. The
            # targets' guidance (w = 7.5) amplifies that difference |1 − w| + w = 14 times, so a few percent flip.
            assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.05


# ================================================================================================ evaluate


def test_evaluate_prints_a_table_per_edit_kind_with_a_legend(finished, capsys):
    cli.main(["evaluate", str(finished)])
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| change_object",
        "| change_attribute_color",
        "| change_background",
        "| all",
    ]
    assert [line.split(" | ")[1] for line in table[1:]] == ["2", "1", "1", "4"]
    for column in pie_bench.BACKGROUND_COLUMNS:  # every column is explained under the table
        assert f"\n{column.header}: " in printed
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["count"] == 4 and set(metrics["by_kind"]) == {
        "change_object",
        "change_attribute_color",
        "change_background",
        "all",
    }
    means = metrics["by_kind"]["all"]
    assert 0 < means["background_mse"] < 1 and 0 < means["background_ssim"] <= 1 and means["background_psnr"] > 0


def test_evaluate_skips_edits_whose_row_changed(pie, model, finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    settings = json.loads((out / "batch.json").read_text())
    mapping = json.loads(pie.read_text())
    mapping["100000000000"]["original_prompt"] = "a red tiger on a white background"
    edited = tmp_path / "mapping_file.json"
    edited.write_text(json.dumps(mapping))
    settings.update(manifest=str(edited), images=str(pie.parent / "annotation_images"))
    (out / "batch.json").write_text(json.dumps(settings))
    cli.main(["evaluate", str(out)])
    assert "not evaluated: 100000000000" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["count"] == 3


# ================================================================================================ image files


def image_files(folder: Path) -> dict[str, Path]:
    """One file per decoding rule: EXIF orientation, 16 bits, alpha, a palette's transparent colour, greyscale."""
    rgb = scene_image(0, size=32)[:24]  # 24 × 32: a rotation shows
    files = {}
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    files["exif_jpeg"] = folder / "exif.jpg"
    PIL.Image.fromarray(rgb).save(files["exif_jpeg"], exif=exif, quality=95)
    files["grey16"] = folder / "grey16.png"
    PIL.Image.fromarray((np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 85)).save(files["grey16"])
    files["rgba"] = folder / "rgba.png"
    alpha = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None], 24, axis=0)
    PIL.Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(files["rgba"])
    files["palette"] = folder / "palette.png"
    palette = PIL.Image.fromarray(rgb).quantize(16)
    palette.save(files["palette"], transparency=3)
    files["grey"] = folder / "grey.png"
    PIL.Image.fromarray(rgb[..., 0]).save(files["grey"])
    files["opaque_palette"] = folder / "opaque_palette.gif"
    PIL.Image.fromarray(rgb).quantize(16).save(files["opaque_palette"])
    return files


def test_image_files_decode_as_diffusers_load_image_where_it_has_a_rule(tmp_path):
    """8-bit files (orientation, greyscale, opaque palettes): exactly what `diffusers.utils.load_image` gives."""
    from diffusers.utils import load_image

    files = image_files(tmp_path)
    for name in ("exif_jpeg", "grey", "opaque_palette"):
        expected = torch.from_numpy(np.asarray(load_image(str(files[name])), dtype=np.float32) / 255).permute(2, 0, 1)
        torch.testing.assert_close(pie_bench.load_image(files[name]), expected, rtol=0, atol=0)
    assert pie_bench.load_image(files["exif_jpeg"]).shape == (3, 32, 24)  # upright: the EXIF rotation applied


def test_one_decoder_for_the_command_line_the_batch_and_the_python_api(pipe, tmp_path):
    """A file given to `npi-edit` (its path), to `batch` (`pie_bench.load_image`) and to the pipeline (a path or
    the opened PIL image) decodes to the same pixels; 16 bits keep their range, transparency is over white."""
    files = image_files(tmp_path)
    for name, path in files.items():
        batch = pie_bench.load_image(path)
        for given in (str(path), path, PIL.Image.open(path)):
            torch.testing.assert_close(
                pipe._prepare_images(given, 32, 32, "stretch"),
                pipe._prepare_images(batch, 32, 32, "stretch"),
                rtol=0,
                atol=0,
            )
    grey16 = np.asarray(PIL.Image.open(files["grey16"]), dtype=np.float32) / 65535
    torch.testing.assert_close(pie_bench.load_image(files["grey16"]), torch.from_numpy(grey16).expand(3, -1, -1))
    rgba = np.asarray(PIL.Image.open(files["rgba"]), dtype=np.float32) / 255
    over_white = rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:]
    torch.testing.assert_close(pie_bench.load_image(files["rgba"]), torch.from_numpy(over_white).permute(2, 0, 1))
    transparent = np.asarray(PIL.Image.open(files["palette"])) == 3
    assert transparent.any() and (pie_bench.load_image(files["palette"])[:, transparent] == 1).all()


def test_crop_mode_crops_before_it_resizes(pipe):
    """A 20000 × 1 strip resized to 64 × 64: resizing the whole strip first would take 64 × 1.28 M × 3 floats (1 GB);
    cropping first keeps the extra memory far below 200 MB. Images of the output's aspect ratio are resized exactly
    as before (one interpolation of the whole image), others are their centred crop of that aspect, resized."""
    strip = np.zeros((1, 20000, 3), dtype=np.uint8)
    strip[0, 9999] = (10, 200, 30)  # the centre pixel (of 0..19999, rounded down): all a centred 1 × 1 crop keeps
    clear_refs = Path("/proc/self/clear_refs")
    if not os.access(clear_refs, os.W_OK):
        pytest.skip("needs Linux's peak-RSS reset (/proc/self/clear_refs)")
    clear_refs.write_text("5")  # the peak resident size (VmHWM) starts again from the current size

    def kib(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))

    start = kib("VmRSS")
    pixels = pipe._prepare_images(strip, 64, 64, "crop")
    assert (kib("VmHWM") - start) * 1024 < 200e6
    torch.testing.assert_close((pixels[0, :, 0, 0] + 1) / 2, torch.tensor([10, 200, 30]) / 255.0)
    assert (pixels == pixels[..., :1, :1]).all()
    square = torch.from_numpy(scene_image(1, size=64)).permute(2, 0, 1)[None] / 255.0
    resized = torch.nn.functional.interpolate(square, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(pipe._prepare_images(square, 32, 32, "crop"), resized * 2 - 1, rtol=0, atol=0)
    wide = torch.cat([torch.zeros(1, 3, 64, 16), square, torch.zeros(1, 3, 64, 16)], dim=-1)  # 64 × 96
    torch.testing.assert_close(pipe._prepare_images(wide, 32, 32, "crop"), resized * 2 - 1, rtol=0, atol=0)


# ================================================================================================ the toy world's score


def test_objects_kept_fails_when_an_edit_loses_or_duplicates_objects():
    """Item 800000000002 of the README's toy folder, edited by NPI + P2P on the embedded model: the background did
    turn black, but the red star is gone and the blue square and the orange triangle are drawn twice. (The file is
    that edit area-downsampled to the judge's 64 px, as the judge reads it.)"""
    from toy_world import evaluate, judge

    edit = evaluate.make_pairs(3, seed=0)[2]
    assert edit.kind == "background" and edit.target_caption.startswith("a red star and a orange triangle")
    image = pie_bench.load_image(Path(__file__).parent / "data" / "toy_background_edit_lost_star.png")
    assert evaluate.attribute_ok(image, edit) and not evaluate.objects_kept(image, edit)
    star, triangle, square = judge.judge(image, edit.target_scene).objects
    assert not star.shape_ok and triangle.duplicates == square.duplicates == 1 and not square.in_place
    assert evaluate.objects_kept(edit.target_image, edit) and evaluate.objects_kept(edit.source_image, edit)


def test_the_toy_worlds_score_adds_its_exact_metrics_to_the_products_table(model, tmp_path, capsys):
    """`python -m toy_world.score DIR`: `npi-edit evaluate`'s table and the toy world's columns, from a batch over a
    toy-world PIE-Bench folder (rendered at the tiny model's 32 px; plain edits, the tiny model has no blend words)."""
    from toy_world import score
    from toy_world.pie_bench import write_pie_bench

    write_pie_bench(tmp_path / "toy", 4, res=32)
    out = tmp_path / "out"
    cli.main(
        [
            "batch",
            str(tmp_path / "toy" / "mapping_file.json"),
            "--out",
            str(out),
            "--model",
            model,
            "--batch-size",
            "4",
            *STEPS,
            *RUN,
        ]
    )
    cli.main(["evaluate", str(out)])
    score.main([str(out)])
    printed = capsys.readouterr().out
    header = [line for line in printed.splitlines() if line.startswith("| edit kind")][-1]
    headers = [cell.strip() for cell in header.strip("|").split("|")]
    assert headers == ["edit kind", "edits"] + [c.header for c in pie_bench.BACKGROUND_COLUMNS + score.TOY_COLUMNS]
    for column in score.TOY_COLUMNS:
        assert f"\n{column.header}: " in printed
    toy, product = (json.loads((out / name).read_text()) for name in ("toy_metrics.json", "metrics.json"))
    assert toy["count"] == product["count"] == 4
    for ours, theirs in zip(toy["items"], product["items"]):
        assert {k: v for k, v in ours.items() if k in theirs} == theirs  # the product's columns, unchanged
        assert isinstance(ours["attribute_ok"], bool) and isinstance(ours["objects_kept"], bool)
        assert ours["edit_psnr"] > 0


def test_the_command_lines_inversion_methods_are_the_pipelines():
    """cli.py lists them without importing the pipeline (fast --help): the two lists must not drift apart."""
    from negative_prompt_inversion.pipeline_negative_prompt_inversion import INVERSION_METHODS

    assert list(cli.INVERSION_METHODS) == list(INVERSION_METHODS)
