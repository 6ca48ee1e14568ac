#!/usr/bin/env python
"""One GPU session for the speed issue (29): every measurement it asks for, in priority order, in a fixed budget.

    python -m benchmarks.speed_session --out DIR [--budget 480] [--stages ...] [--quick --device cpu]

(``benchmarks/gpu_speed_session.sh`` installs the carried wheels first and then runs this.) Each stage is its own
process with its own time limit, so a stage that fails or overruns is recorded and the next one starts; what a
stage wrote before it was stopped is kept (the benchmarks rewrite their JSON after every row). Stages, in order
(SD 1.5 architecture at 512 px and SDXL's at 1024 px, random weights, bfloat16, NPI invert + P2P word swap with
local blend, 50 + 50 steps; CUDA graphs in every compiled mode):

  di_cost                speed.py's one-target P2P edit with NPI and with Direct Inversion (issue 26: ≤ 1.05×),
                         regional compile, the same rows and graphs, one process
  regional_cold          speed.py headline, ``compile="regional"``, empty inductor cache: first call, steady state
  regional_warm          regional_cold again in a new process over the cache it left: a user's second process
  whole_cold             speed.py headline, whole-model compile (``compile=True``), its own empty cache
  batch_bf16             batch.py, regional, batch 16 (48 UNet samples per edit step): edits/s
  toy_fp8                pie_bench.py on the toy world (model_v2) in bfloat16, then FP8: reconstruction PSNR, rows
  batch_fp8              batch_bf16 with ``pipe.enable_fp8()``
  regional_transformer   regional_cold compiling the transformer blocks only (diffusers' own ``_repeated_blocks``):
                         fewer graphs to compile, resnets eager inside the graphs; its own empty cache
  kernels                kernels.py: attention backends at the UNet's shapes, VAE decoder layout
  sdxl_regional          speed.py SDXL headline, regional
  sdxl_fp8               the same with FP8
  Only when named in ``--stages``: regional_dynamic (regional with dynamic shapes, its own empty cache), and
  batch_fp8 and sdxl_fp8 (``enable_cuda_graphs`` refuses an FP8 UNet for now: they record the refusal).

Every speed and batch row carries its UNet TFLOP/s, the fraction of a bf16 matrix-product peak measured in the
same process, and a breakdown (UNet, attention, VAE, text encoders, other). Writes DIR/<stage>/ (each stage's
own outputs and log.txt), DIR/session.json and DIR/session.md: a compact table and the issue's must-holds, printed
last. ``--quick --device cpu`` runs the same stages on tiny models (a smoke test of this script: compiled modes and
graphs run eagerly on a CPU, and FP8 fails there with its error recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()
HEADLINE = r"invert \+ P2P"  # speed.py's headline row: NPI invert + P2P edit (1 target) incl. VAE
TARGETS = {
    "single_s": 0.6,
    "first_call_s": 30.0,
    "steady_vs_whole": 0.05,
    "edits_per_s": 3.0,
    "sdxl_s": 3.3,
    "fp8_recon_db": 0.5,
    "di_vs_npi": 1.05,
}


@dataclass
class Stage:
    name: str
    what: str
    cap: float  # seconds this stage may take at most
    commands: list[list[str]]
    cache: str  # inductor cache folder (stages naming the same one share it)
    kind: str  # speed, batch, toy or kernels: how its outputs are summarised
    minimum: float = 40.0  # not started with less budget left than this
    result: dict = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def stages(args) -> list[Stage]:
    out, quick = args.out, args.quick
    python = [sys.executable, "-m"]
    device = ["--device", args.device]
    bf16 = ["--dtype", "bfloat16"] if not quick else []
    single = [
        "--no-peers",
        "--no-nti",
        "--only",
        HEADLINE,
        "--compile-reserve",
        "0",
        *(["--quick", "--repeats", "2"] if quick else ["--repeats", "5"]),
        *device,
        *bf16,
    ]
    batch_size = ["1"] if quick else ["16"]
    batch = [
        "--batch-sizes",
        *batch_size,
        "--modes",
        "regional",
        *(["--quick", "--repeats", "1"] if quick else ["--repeats", "2"]),
        *device,
        *bf16,
    ]
    pairs = str(args.toy_pairs or (2 if quick else 64))
    toy = [
        "--data",
        str(args.scratch / "toy_data"),
        "--model",
        str(ROOT / "toy_world" / "model_v2"),
        "--rows",
        *args.toy_rows,
        "--batch-size",
        pairs,
        "--grid",
        "0",
        *device,
        "--dtype",
        "bfloat16",
        *(["--limit", pairs, "--steps", "3", "--threads", "1"] if quick else []),
    ]

    def speed(name, *extra):
        return [*python, "benchmarks.speed", "--out", str(out / name), *single, *extra]

    return [
        Stage(
            "regional_cold",
            "SD 1.5 headline, regional compile, empty cache",
            160,
            [speed("regional_cold", "--modes", "regional")],
            "regional",
            "speed",
        ),
        Stage(
            "regional_transformer",
            "SD 1.5 headline, regional: transformer blocks only, empty cache",
            100,
            [speed("regional_transformer", "--modes", "regional", "--regional-blocks", "BasicTransformerBlock")],
            "regional_transformer",
            "speed",
        ),
        Stage(
            "regional_warm",
            "SD 1.5 headline, regional compile, new process, warm cache",
            80,
            [speed("regional_warm", "--modes", "regional")],
            "regional",
            "speed",
        ),
        Stage(
            "whole_cold",
            "SD 1.5 headline, whole-model compile, empty cache",
            200,
            [speed("whole_cold", "--modes", "compiled")],
            "whole",
            "speed",
        ),
        Stage(
            "di_cost",
            "SD 1.5 P2P edit (1 target), NPI then Direct Inversion, regional compile, empty cache",
            200,
            [speed("di_cost", "--modes", "regional", "--only", "P2P edit, 1 target")],
            "di_cost",
            "speed",
        ),
        Stage(
            "batch_bf16",
            f"batch {batch_size[0]}, regional, bf16",
            240,
            [[*python, "benchmarks.batch", "--out", str(out / "batch_bf16"), *batch]],
            "regional",
            "batch",
        ),
        Stage(
            "batch_fp8",
            f"batch {batch_size[0]}, regional, FP8",
            240,
            [[*python, "benchmarks.batch", "--out", str(out / "batch_fp8"), *batch, "--fp8"]],
            "regional",
            "batch",
        ),
        Stage(
            "toy_fp8",
            "toy world: bf16 then FP8 on the same pairs",
            120,
            [
                [
                    *python,
                    "benchmarks.pie_bench",
                    "--write-toy",
                    pairs,
                    "--res",
                    "128",
                    "--out",
                    str(out / "toy_fp8" / "bf16"),
                    *toy,
                ],
                [*python, "benchmarks.pie_bench", "--out", str(out / "toy_fp8" / "fp8"), *toy, "--fp8"],
            ],
            "toy",
            "toy",
            minimum=40,
        ),
        Stage(
            "kernels",
            "attention backends, VAE layout",
            60,
            [
                [
                    *python,
                    "benchmarks.kernels",
                    "--out",
                    str(out / "kernels"),
                    *device,
                    *(["--quick"] if quick else ["--dtype", "bfloat16"]),
                ]
            ],
            "kernels",
            "kernels",
            minimum=20,
        ),
        Stage(
            "sdxl_regional",
            "SDXL headline, regional compile",
            240,
            [speed("sdxl_regional", "--modes", "regional", "--model", "sdxl")],
            "sdxl",
            "speed",
            minimum=90,
        ),
        Stage(
            "sdxl_fp8",
            "SDXL headline, regional compile, FP8",
            240,
            [speed("sdxl_fp8", "--modes", "regional", "--model", "sdxl", "--fp8")],
            "sdxl",
            "speed",
            minimum=90,
        ),
        Stage(
            "regional_dynamic",
            "SD 1.5 headline, regional, dynamic shapes, empty cache",
            150,
            [speed("regional_dynamic", "--modes", "regional", "--regional-dynamic")],
            "regional_dynamic",
            "speed",
        ),
    ]


# batch_fp8 and sdxl_fp8 run only when named: enable_cuda_graphs() refuses an FP8 UNet (its compiled graphs did not
# reproduce eager FP8 edits), so today they record that refusal
DEFAULT_STAGES = (
    "di_cost",
    "regional_cold",
    "regional_warm",
    "whole_cold",
    "batch_bf16",
    "toy_fp8",
    "regional_transformer",
    "kernels",
    "sdxl_regional",
)
REGIONAL_STAGES = ("regional_cold", "regional_transformer", "regional_dynamic", "regional_warm")


def run_stage(stage: Stage, args, caches: Path) -> None:
    """Run the stage's commands in order within its time limit; the whole process group is ended on overrun."""
    folder = args.out / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    left = args.budget - (time.perf_counter() - T0)
    limit = min(stage.cap * (4 if args.quick else 1), left)  # a small shared CPU is slow even on tiny models
    stage.result = {"name": stage.name, "what": stage.what, "status": "ok", "limit_s": limit}
    if limit < stage.minimum:
        stage.result.update(status="skipped", error=f"{left:.0f} s of the budget left, needs {stage.minimum:.0f}")
        log(f"{stage.name}: skipped ({stage.result['error']})")
        return
    cache = caches / stage.cache
    env = dict(
        os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"), PYTHONUNBUFFERED="1"
    )
    started = time.perf_counter()
    log(f"{stage.name}: {stage.what} (limit {limit:.0f} s)")
    with open(folder / "log.txt", "w") as log_file:
        for command in stage.commands:
            remaining = limit - (time.perf_counter() - started)
            if "--time-budget" not in command and command[2] in ("benchmarks.speed", "benchmarks.batch"):
                command = [*command, "--time-budget", str(max(remaining - 15, 10))]
            log_file.write("$ " + " ".join(command) + "\n")
            log_file.flush()
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = process.wait(timeout=max(remaining, 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the stage's own process group: its compile workers too
                process.wait()
                stage.result.update(status="timeout", error=f"stopped after {limit:.0f} s")
                break
            if rc != 0:
                stage.result.update(status="failed", error=f"exit code {rc}: {last_error(folder / 'log.txt')}")
                break
    stage.result["seconds"] = time.perf_counter() - started
    try:
        stage.result["summary"] = SUMMARIES[stage.kind](folder)
    except Exception as error:  # noqa: BLE001
        stage.result.setdefault("error", f"no results: {type(error).__name__}: {error}")
    log(
        f"{stage.name}: {stage.result['status']} in {stage.result['seconds']:.0f} s"
        + (f" ({stage.result['error']})" if stage.result.get("error") else "")
    )


def last_error(path: Path) -> str:
    """The last line of a log that looks like an error."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:300]


# =================================================================================================================
# Summaries of each stage's outputs


def speed_summary(folder: Path) -> dict:
    data = json.loads((folder / "speed.json").read_text())
    meta = data["metadata"]
    rows = [compact_row(row) for row in data["rows"]]
    return {
        "rows": rows,
        "peak_tflops": meta.get("peak_tflops"),
        "fp8_linear_layers": meta.get("fp8_linear_layers"),
        "linear_layers": meta.get("linear_layers"),
        "device": meta.get("device_name"),
        "torch": meta.get("torch"),
        "diffusers": meta.get("diffusers"),
        "git_commit": meta.get("git_commit"),
        "model": meta.get("model"),
    }


def batch_summary(folder: Path) -> dict:
    data = json.loads((folder / "batch.json").read_text())
    meta = data["metadata"]
    return {
        "rows": [compact_row(row) for row in data["rows"]],
        "peak_tflops": meta.get("peak_tflops"),
        "fp8_linear_layers": meta.get("fp8_linear_layers"),
        "linear_layers": meta.get("linear_layers"),
    }


def compact_row(row: dict) -> dict:
    keys = (
        "name",
        "mode",
        "batch_size",
        "median_s",
        "edits_per_s",
        "unet_tflops",
        "unet_tflops_in_unet",
        "peak_fraction",
        "attention_s",
        "breakdown",
        "compile_stats",
        "error",
        "unet_samples",
    )
    result = {key: row[key] for key in keys if row.get(key) is not None}
    if row.get("warmup_times_s"):
        result["first_call_s"] = row["warmup_times_s"][0]
    return result


def toy_summary(folder: Path) -> dict:
    result = {}
    for precision in ("bf16", "fp8"):
        path = folder / precision / "pie_bench.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        recon = {name: sum(values) / len(values) for name, values in data["reconstruction"].items() if values}
        keys = ("background_psnr", "edit_psnr", "unedited_psnr_exact", "attribute_ok", "objects_kept")
        rows = {name: {key: summary[key] for key in keys if key in summary} for name, summary in data["rows"].items()}
        result[precision] = {
            "reconstruction_psnr": recon,
            "rows": rows,
            "items": data["items"],
            "fp8_linear_layers": data["args"].get("fp8_linear_layers"),
            "linear_layers": data["args"].get("linear_layers"),
        }
    return result


def kernels_summary(folder: Path) -> dict:
    """kernels.py's result, with the table it rendered (kernels.md) for session.md."""
    return {**json.loads((folder / "kernels.json").read_text()), "markdown": (folder / "kernels.md").read_text()}


SUMMARIES = {"speed": speed_summary, "batch": batch_summary, "toy": toy_summary, "kernels": kernels_summary}


# =================================================================================================================
# The session's table


def fmt(value, spec: str = "{:.3f}") -> str:
    return "—" if value is None else spec.format(value)


def breakdown_cell(row: dict) -> str:
    parts = row.get("breakdown")
    if not parts:
        return ""
    attention = f" (attn {row['attention_s']:.3f})" if row.get("attention_s") is not None else ""
    return (
        f"{parts['unet_s']:.3f}{attention} / {parts['vae_s']:.3f} / {parts['text_encoders_s']:.3f} / "
        f"{parts['other_s']:.3f}"
    )


def session_markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        f"## Speed session on {meta.get('device') or meta['host']}",
        "",
        f"torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, commit {meta.get('git_commit')}; "
        f"budget {meta['budget_s']:.0f} s, used {meta['elapsed_s']:.0f} s. Peak matmul (bf16 on a GPU) "
        f"{fmt(meta.get('peak_tflops'), '{:.4g}')} TFLOP/s.",
        "",
        "| stage | row | first call s | median s | edits/s | UNet TFLOP/s (in UNet) | % peak | UNet (attn) / VAE / "
        "text / other s | graphs, compile s | status |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for result in results:
        summary = result.get("summary") or {}
        rows = summary.get("rows") if isinstance(summary.get("rows"), list) else None
        status = result["status"] + (f": {result['error']}" if result.get("error") else "")
        status = status.replace("|", "/")[:160]
        if not rows:
            if result["name"] not in ("toy_fp8", "kernels") or result["status"] != "ok":
                lines.append(f"| {result['name']} | — | | | | | | | | {status} |")
            continue
        for row in rows:
            label = (
                row["name"].replace(" (1 target) incl. VAE", "")
                if row.get("name")
                else f"batch {row.get('batch_size')}"
            ) + f" [{row.get('mode')}]"
            rate = fmt(row.get("unet_tflops"), "{:.3g}") + (
                f" ({row['unet_tflops_in_unet']:.3g})" if row.get("unet_tflops_in_unet") else ""
            )
            stats = row.get("compile_stats") or {}
            compiled = f"{stats.get('graphs_compiled')}, {fmt(stats.get('compile_s'), '{:.0f}')}" if stats else ""
            fp8 = (
                f"FP8 {summary['fp8_linear_layers']}/{summary['linear_layers']} linear; "
                if summary.get("fp8_linear_layers") is not None
                else ""
            )
            lines.append(
                f"| {result['name']} | {label.replace('|', '/')[:48]} | {fmt(row.get('first_call_s'), '{:.1f}')} | "
                f"{fmt(row.get('median_s'))} | {fmt(row.get('edits_per_s'), '{:.2f}')} | {rate} | "
                f"{fmt(row.get('peak_fraction'), '{:.1%}')} | {breakdown_cell(row)} | {compiled} | "
                f"{fp8}{(row.get('error') or status)[:120]} |"
            )
    lines += (
        toy_lines(results)
        + kernel_lines(results)
        + ["", "Must-holds (issue 29; issue 26's DI cost):", ""]
        + must_holds(results)
    )
    return "\n".join(lines) + "\n"


def toy_lines(results: list[dict]) -> list[str]:
    toy = next((r.get("summary") for r in results if r["name"] == "toy_fp8" and r.get("summary")), None)
    if not toy:
        return []
    lines = [
        "",
        "Toy world (model_v2), same pairs: reconstruction PSNR (dB) and PIE-Bench-format rows",
        "",
        "| precision | FP8 linear layers | recon NPI | recon VAE | row | items | bg PSNR | edit PSNR | "
        "unedited PSNR | attribute acc. |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for precision, data in toy.items():
        recon = data["reconstruction_psnr"]
        layers = (
            f"{data['fp8_linear_layers']} of {data['linear_layers']}"
            if data.get("fp8_linear_layers") is not None
            else "—"
        )
        for name, row in data["rows"].items():
            lines.append(
                f"| {precision} | {layers} | {fmt(recon.get('NPI'), '{:.2f}')} | "
                f"{fmt(recon.get('VAE'), '{:.2f}')} | {name} | {data['items'].get(name)} | "
                f"{fmt(row.get('background_psnr'), '{:.2f}')} | {fmt(row.get('edit_psnr'), '{:.2f}')} | "
                f"{fmt(row.get('unedited_psnr_exact'), '{:.2f}')} | {fmt(row.get('attribute_ok'), '{:.1%}')} |"
            )
    return lines


def kernel_lines(results: list[dict]) -> list[str]:
    kernels = next((r.get("summary") for r in results if r["name"] == "kernels" and r.get("summary")), None)
    return ["", *kernels["markdown"].rstrip().splitlines()] if kernels else []


def headline(results: list[dict], stage: str) -> dict | None:
    for result in results:
        if result["name"] == stage:
            rows = (result.get("summary") or {}).get("rows") or []
            return next((row for row in rows if row.get("median_s") is not None), None)
    return None


def must_holds(results: list[dict]) -> list[str]:
    def check(ok) -> str:
        return "—" if ok is None else "**yes**" if ok else "**no**"

    whole = headline(results, "whole_cold")
    regional = {name: row for name in REGIONAL_STAGES if (row := headline(results, name))}
    singles = {name: row["median_s"] for name, row in [*regional.items(), ("whole_cold", whole)] if row}
    lines = []
    best = min(singles, key=singles.get) if singles else None
    seconds = singles.get(best)
    lines.append(
        f"- single image ≤ {TARGETS['single_s']} s compiled: {fmt(seconds)} s ({best}) → "
        f"{check(None if seconds is None else seconds <= TARGETS['single_s'])}"
    )
    if whole:
        lines.append(
            f"- whole-model compile (reference): first call {fmt(whole.get('first_call_s'), '{:.1f}')} s, "
            f"steady {fmt(whole['median_s'])} s"
        )
    for name, row in regional.items():
        first = row.get("first_call_s")
        line = (
            f"- {name}: first call ≤ {TARGETS['first_call_s']:.0f} s: {fmt(first, '{:.1f}')} s → "
            f"{check(None if first is None else first <= TARGETS['first_call_s'])}"
        )
        if whole:
            ratio = row["median_s"] / whole["median_s"] - 1
            line += (
                f"; steady state within {TARGETS['steady_vs_whole']:.0%} of whole-model: {ratio:+.1%} → "
                f"{check(ratio <= TARGETS['steady_vs_whole'])}"
            )
        lines.append(line)
    for stage in ("batch_bf16", "batch_fp8"):
        row = headline(results, stage)
        rate = row.get("edits_per_s") if row else None
        lines.append(
            f"- batch throughput ≥ {TARGETS['edits_per_s']} edits/s ({stage}): {fmt(rate, '{:.2f}')} → "
            f"{check(None if rate is None else rate >= TARGETS['edits_per_s'])}"
        )
    for stage in ("sdxl_regional", "sdxl_fp8"):
        row = headline(results, stage)
        seconds = row["median_s"] if row else None
        lines.append(
            f"- SDXL invert + P2P ≤ {TARGETS['sdxl_s']} s ({stage}): {fmt(seconds)} s → "
            f"{check(None if seconds is None else seconds <= TARGETS['sdxl_s'])}"
        )
    rows = next((r["summary"]["rows"] for r in results if r["name"] == "di_cost" and r.get("summary")), [])
    cost = {row["name"]: row.get("median_s") for row in rows}
    npi, di = cost.get("NPI P2P edit, 1 target"), cost.get("DI P2P edit, 1 target")
    if npi and di:
        lines.append(
            f"- DI+P2P edit ≤ {TARGETS['di_vs_npi']}× an NPI+P2P edit (issue 26): {di:.3f} s / {npi:.3f} s = "
            f"{di / npi:.3f}× → {check(di / npi <= TARGETS['di_vs_npi'])}"
        )
    toy = next((r.get("summary") for r in results if r["name"] == "toy_fp8" and r.get("summary")), {})
    if "bf16" in toy and "fp8" in toy:
        drop = toy["bf16"]["reconstruction_psnr"].get("NPI", float("nan")) - toy["fp8"]["reconstruction_psnr"].get(
            "NPI", float("nan")
        )
        lines.append(
            f"- FP8 toy reconstruction within {TARGETS['fp8_recon_db']} dB of bf16: {drop:+.2f} dB lower → "
            f"{check(drop <= TARGETS['fp8_recon_db'])}"
        )
    return lines


# =================================================================================================================


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--budget", type=float, default=480.0, help="seconds for all stages (from this script's start)"
    )
    parser.add_argument(
        "--stages", nargs="+", default=None, help=f"stages in order (default: {' '.join(DEFAULT_STAGES)})"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test of the session")
    parser.add_argument("--toy-pairs", type=int, default=None, help="toy-world pairs for the FP8 quality stage (64)")
    parser.add_argument("--toy-rows", nargs="+", default=["NPI+P2P", "ProxNPI+P2P"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # inductor caches (empty: "cold" means cold, whatever ran on this machine before) and the toy pairs
    args.scratch = Path(tempfile.mkdtemp(prefix="npi-speed-session-"))
    available = {stage.name: stage for stage in stages(args)}
    names = args.stages or list(DEFAULT_STAGES)
    unknown = [name for name in names if name not in available]
    if unknown:
        shutil.rmtree(args.scratch, ignore_errors=True)
        parser.error(f"unknown stages {unknown}; choose from {sorted(available)}")
    caches = args.scratch / "inductor"
    meta = {"host": platform.node(), "budget_s": args.budget, "stages": names, "argv": sys.argv, "caches": str(caches)}
    results = []
    try:
        for name in names:
            stage = available[name]
            run_stage(stage, args, caches)
            results.append(stage.result)
            meta.update(
                {
                    key: value
                    for key, value in (stage.result.get("summary") or {}).items()
                    if key in ("device", "torch", "diffusers", "git_commit", "peak_tflops")
                    and value
                    and key not in meta
                }
            )
            write(args.out, meta, results)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    table = write(args.out, meta, results)
    print(flush=True)
    print(table, flush=True)
    return 0


def write(out: Path, meta: dict, results: list[dict]) -> str:
    meta["elapsed_s"] = time.perf_counter() - T0
    (out / "session.json").write_text(json.dumps({"metadata": meta, "stages": results}, indent=2, default=str))
    table = session_markdown(meta, results)
    (out / "session.md").write_text(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
