"""The ``npi-edit`` command line on the small toy model (v1, 64 px; CPU, 3 steps): single images, batches over a toy
PIE-Bench folder and a JSONL manifest with bad rows, resume, two processes, evaluate.

Every run uses one torch thread, so the in-process runs and the two launched processes compute alike; outputs are
compared byte for byte (same batch composition, see cli.py), timings never.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from negative_prompt_inversion import cli
from toy_world.evaluate import SMALL_MODEL_DIR, SMALL_MODEL_RES
from toy_world.pie_bench import write_pie_bench


COMMON = ["--model", str(SMALL_MODEL_DIR), "--steps", "3", "--threads", "1", "--device", "cpu"]
BATCH = ["--batch-size", "2", "--p2p", *COMMON]


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pie(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pie")
    mapping = write_pie_bench(folder, count=4, res=SMALL_MODEL_RES)
    return folder, mapping


@pytest.fixture(scope="module")
def finished(pie, tmp_path_factory):
    """A finished single-process batch over the toy PIE-Bench folder."""
    out = tmp_path_factory.mktemp("single")
    cli.main(["batch", str(pie[0] / "mapping_file.json"), "--out", str(out), *BATCH])
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def output_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # torch.compile's own imports
def test_invert_then_edit_one_image(pie, tmp_path):
    folder, mapping = pie
    entry = next(iter(mapping.values()))
    source, target = (entry[k].replace("[", "").replace("]", "") for k in ("original_prompt", "editing_prompt"))
    inversion = tmp_path / "inv.safetensors"
    cli.main(["invert", str(folder / "annotation_images" / entry["image_path"]), "--prompt", source,
              "--out", str(inversion), "--method", "ddim", *COMMON])
    assert json.loads(safe_open(inversion, "pt").metadata()["inversion"])["method"] == "ddim"
    edited = tmp_path / "edited.png"
    cli.main(["edit", str(inversion), "--prompt", target, "--p2p", "--blend", *entry["blended_word"].split(),
              "--proximal", "soft", "--cuda-graphs", "--compile", "--out", str(edited), *COMMON])  # graphs: CUDA only
    assert Image.open(edited).size == (64, 64)
    with pytest.raises(SystemExit, match="--blend"):
        cli.main(["edit", str(inversion), "--prompt", target, "--blend", "a", "b", "--out", str(edited)])
    with pytest.raises(SystemExit, match="INVERSION: no file"):
        cli.main(["edit", str(tmp_path / "missing.safetensors"), "--out", str(edited)])
    with pytest.raises(SystemExit, match="--model: no diffusers folder"):
        cli.main(["edit", str(inversion), "--model", str(tmp_path / "no-model"), "--out", str(edited)])


def test_batch_writes_every_output_and_line(pie, finished):
    lines = records(finished)
    assert [r["id"] for r in lines] == list(pie[1]) and {r["status"] for r in lines} == {"ok"}
    for record in lines:
        assert set(record["sha256"]) == {record["outputs"]["inversion"], *record["outputs"]["edits"]}
        assert all((finished / name).is_file() for name in record["sha256"])
        assert set(record["seconds"]) == {"invert", "edit"}


def test_bad_items_are_recorded_and_the_batch_goes_on(pie, tmp_path):
    folder, mapping = pie
    good = [(key, entry) for key, entry in mapping.items()][:2]
    (tmp_path / "broken.png").write_text("not an image")
    Image.new("L", (8, 8)).save(tmp_path / "small_mask.png")
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    def row(key, entry, **kw):
        return {
            "id": key, "image": str(folder / "annotation_images" / entry["image_path"]),
            "source_prompt": entry["original_prompt"].replace("[", "").replace("]", ""),
            "target_prompt": entry["editing_prompt"].replace("[", "").replace("]", ""),
            "blend": entry["blended_word"], **kw}
    rows = [
        row(*good[0], mask="mask.png"),
        row("missing", good[0][1], image="nowhere.png"),
        row("unreadable", good[0][1], image="broken.png"),
        row("blend", good[0][1], blend="giraffe zebra"),
        row("mask", good[0][1], mask="small_mask.png"),
        {"id": "columns", "image": "x.png"},
        row(*good[1]),
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cli.main(["batch", str(manifest), "--out", str(out), *BATCH])
    status = {r["id"]: (r["status"], r["error"]) for r in records(out)}
    assert status[good[0][0]][0] == status[good[1][0]][0] == "ok"
    assert "nowhere.png" in status["missing"][1] and "unreadable image" in status["unreadable"][1]
    assert "'giraffe'" in status["blend"][1] and "small_mask.png" in status["mask"][1]
    assert "target_prompt" in status["columns"][1]


def test_resume_recomputes_only_what_is_missing(finished, pie, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(finished, out)
    before = output_files(out)
    last = records(finished)[-1]
    (out / last["outputs"]["edits"][0]).unlink()
    shard = out / "results.0.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-1]) + lines[-1][:40])  # the crash cut the last line
    cli.main(["batch", str(pie[0] / "mapping_file.json"), "--out", str(out), *BATCH])
    new = [json.loads(line) for line in shard.read_text().splitlines()[len(lines):]]
    assert [r["id"] for r in new] == [last["id"]]
    assert output_files(out) == before


def test_two_processes_equal_one(pie, finished, tmp_path):
    package = tmp_path / "site"  # this checkout as the package, whatever an editable install points at
    package.mkdir()
    (package / "negative_prompt_inversion").symlink_to(ROOT, target_is_directory=True)
    env = dict(os.environ, PYTHONPATH=str(package), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "negative_prompt_inversion", "batch", str(pie[0] / "mapping_file.json"), "--out", str(out), *BATCH]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("results.*.jsonl")) == ["results.0.jsonl", "results.1.jsonl"]
    assert output_files(out) == output_files(finished)
    assert [(r["id"], r["sha256"]) for r in records(out)] == [(r["id"], r["sha256"]) for r in records(finished)]


def test_evaluate_gives_finite_metrics_and_a_sharp_reconstruction(pie, finished, tmp_path, capsys):
    cli.main(["evaluate", str(finished)])
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["count"] == 4 and "background_psnr" in capsys.readouterr().out
    assert all(math.isfinite(v) for v in metrics["mean"].values())
    out = tmp_path / "reconstruction"
    cli.main(["batch", str(pie[0] / "mapping_file.json"), "--out", str(out), "--reconstruct",
              *[a for a in BATCH if a != "--p2p"]])
    cli.main(["evaluate", str(out)])
    reconstruction = json.loads((out / "metrics.json").read_text())["mean"]
    assert reconstruction["background_psnr"] > metrics["mean"]["background_psnr"]
    assert reconstruction["background_psnr"] > 28


def test_batch_size_changes_outputs_only_by_rounding(pie, finished, tmp_path):
    """Batch size 1 against 2: the pipeline's kernels round differently per batch shape (README, "Batches")."""
    out = tmp_path / "one"
    cli.main(["batch", str(pie[0] / "mapping_file.json"), "--out", str(out),
              *[a if a != "2" else "1" for a in BATCH]])
    for record in records(finished):
        inversion = record["outputs"]["inversion"]
        a, b = (load_file(folder / inversion)["latents"] for folder in (finished, out))
        eps = torch.finfo(torch.float32).eps
        assert (a - b).abs().max() <= 256 * eps * a.abs().max()  # 3 steps of float32 rounding, with margin
        for name in record["outputs"]["edits"]:
            x, y = (np.asarray(Image.open(folder / name), dtype=np.int16) for folder in (finished, out))
            assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01  # a rounding flip of the 8-bit output


def test_resume_refuses_other_settings(pie, finished):
    with pytest.raises(SystemExit, match="other settings \\(steps\\)"):
        cli.main(["batch", str(pie[0] / "mapping_file.json"), "--out", str(finished),
                  *[a if a != "3" else "4" for a in BATCH]])


def test_csv_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("image,source_prompt,target_prompt,blend\ncat.png,a cat,a dog,cat dog\n")
    (item,) = cli.read_manifest(tmp_path / "m.csv", images=str(tmp_path / "imgs"))
    assert (item.id, item.image, item.target_prompts, item.blend) == (
        "000000", tmp_path / "imgs" / "cat.png", ["a dog"], ("cat", "dog"))
    with pytest.raises(FileNotFoundError, match="MANIFEST: no file"):
        cli.read_manifest(tmp_path / "missing.csv")
