#!/usr/bin/env python
"""Batch-editing throughput of NegativePromptInversionPipeline, in edits per second, on one or several GPUs.

    python benchmarks/batch.py --out DIR [--batch-sizes 1 4 8] [--modes eager cuda_graphs compiled] [--quick]
    accelerate launch --num_processes 2 benchmarks/batch.py --out DIR --baseline-json ONE_GPU_DIR/batch.json

One timed run edits one batch of ``b`` images end to end: ``pipe.invert(images, sources)`` (text + VAE encode,
``--steps`` DDIM inversion steps) then ``pipe(prompt=targets, inversion=inv, attention_control=p2p)`` (``--steps``
steps + VAE decode to PIL), where image i gets its own target ("a photo of a cat sitting on a wall" → dog, tiger,
horse, bear, cycled) and its own local-blend pair: ``PromptToPrompt(cross_replace_steps=0.4,
self_replace_steps=0.6, local_blend=LocalBlend([("cat", target_word_i), ...]))``. Models: the SD 1.5 architecture
with random weights from ``speed.py`` (no downloads; speed does not depend on the weights' values).

Each row (mode, batch size): median seconds per batch over ``--repeats`` timed runs after ``--warmup`` untimed ones
(the first call, which captures CUDA graphs or compiles, is reported separately), edits/s = b / median, peak GPU
memory, the UNet calls (``pipe.count_unet_calls()``) and speed.py's utilisation columns (UNet TFLOP/s, % of a
measured peak, breakdown). Modes as in speed.py: ``eager``; ``cuda_graphs`` (``pipe.enable_cuda_graphs()``);
``compiled`` (channels-last UNet + ``enable_cuda_graphs(compile=True)``); ``regional`` (``compile="regional"``).
``--fp8``: ``pipe.enable_fp8()``.

Under ``accelerate launch --num_processes N`` every process drives its own GPU (``accelerate.PartialState``), all
start each run together (a barrier before every run), and rank 0 reports the aggregate N × b / (the slowest
process's median), and with ``--baseline-json`` (a 1-GPU run's batch.json) the scaling over that run's edits/s.

Writes DIR/batch.json (rewritten after every row) and DIR/batch.md (the table, printed last). ``--quick`` is a CPU
smoke test: the tiny model, 3 steps, 64 px, 1 repeat, batch sizes 1 2.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers.utils import logging as diffusers_logging

from benchmarks.speed import (  # speed.py sets offline env defaults first
    COMPILE_MODES,
    MODELS,
    MODES,
    SOURCE,
    SOURCE_WORD,
    TARGET_WORDS,
    TARGETS,
    add_run_options,
    build_components,
    environment_metadata,
    format_per_call,
    log,
    measure,
    prepare_run,
    random_image,
    set_pipeline_mode,
    summarize_calls,
    utilisation_note,
)
from benchmarks.utilisation import ComponentTimer, compile_stats, format_breakdown, format_utilisation, row_utilisation
from negative_prompt_inversion.pipeline_negative_prompt_inversion import (
    LocalBlend,
    NegativePromptInversionPipeline,
    PromptToPrompt,
)


DEFAULT_MODES = ("eager", "cuda_graphs", "compiled")
TARGET_EDITS_PER_S = 2.5  # the batch-editing issue's targets: one H200 …
TARGET_SCALING_2_GPUS = 1.9  # … and two GPUs against one


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for batch.json and batch.md")
    parser.add_argument(
        "--device", default=None, help="cuda (each process its own GPU) or cpu; default cuda if available"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="images per pipeline call (1 4 8; --quick: 1 2)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=None,
        help="default: eager cuda_graphs compiled on CUDA, eager on a CPU (where the others run eagerly"
        " anyway); regional: enable_cuda_graphs(compile='regional')",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="DDIM steps of inversion and of the edit (50; --quick: 3)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side in px (512; --quick: 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (3; --quick: 1)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs before the timed ones (the first captures/compiles)"
    )
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="sd15 (default) or tiny (--quick)")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="float16 on CUDA (bfloat16 with --fp8), float32 on CPU by default",
    )
    add_run_options(parser)
    parser.add_argument(
        "--quick", action="store_true", help="CPU smoke test: tiny model, 3 steps, 64 px, 1 repeat, batch sizes 1 2"
    )
    parser.add_argument(
        "--baseline-json",
        type=Path,
        default=None,
        help="batch.json of a 1-process run: report scaling against its edits/s per (mode, batch size)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=480.0,
        help="seconds since start after which remaining rows are skipped (the table is still written)",
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 4, 8])
    args.steps = args.steps or (3 if args.quick else 50)
    args.size = args.size or (64 if args.quick else 512)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.model = args.model or ("tiny" if args.quick else "sd15")
    args.dtype = args.dtype or ("bfloat16" if args.fp8 else "float16" if args.device.startswith("cuda") else "float32")
    args.modes = args.modes or (list(DEFAULT_MODES) if args.device.startswith("cuda") else ["eager"])
    return args


def edit_inputs(batch: int, size: int):
    """Batch ``b``: distinct images, one source prompt each, target i = TARGETS[i mod 4], one local-blend pair each."""
    images = [random_image(size, seed=i) for i in range(batch)]
    targets = [TARGETS[i % len(TARGETS)] for i in range(batch)]
    blend = LocalBlend([(SOURCE_WORD, TARGET_WORDS[i % len(TARGET_WORDS)]) for i in range(batch)])
    p2p = PromptToPrompt(cross_replace_steps=0.4, self_replace_steps=0.6, local_blend=blend)
    return images, [SOURCE] * batch, targets, p2p


class BatchBenchmark:
    """One process's run: its device, the models and pipeline, and the rows so far (kept by rank 0)."""

    def __init__(self, args):
        self.args, self.started = args, time.perf_counter()
        self.deadline = self.started + args.time_budget
        self.state = PartialState(cpu=not args.device.startswith("cuda"))
        self.world = self.state.num_processes
        # accelerate names a single process's GPU "cuda", without the index set_device needs
        self.device = (
            torch.device("cuda", self.state.local_process_index)
            if args.device.startswith("cuda")
            else torch.device(args.device)
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = getattr(torch, args.dtype)
        self.meta = {
            **environment_metadata(self.device),
            "processes": self.world,
            "model": args.model,
            "dtype": args.dtype,
            "size": args.size,
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "batch_sizes": args.batch_sizes,
            "modes": args.modes,
            "quick": args.quick,
            "prompts": {"source": SOURCE, "targets": TARGETS},
        }
        self.baseline = self.load_baseline(args.baseline_json)
        self.rows: list[dict] = []
        self.log(
            f"{self.world} process(es) on {self.meta['device_name']}; model {args.model}, {args.dtype}, "
            f"{args.size}px, {args.steps} + {args.steps} steps"
        )
        workdir = Path(tempfile.mkdtemp(prefix=f"npi-batch-{self.state.process_index}-"))
        self.components = build_components(args.model, self.device, self.dtype, workdir)
        self.pipe = NegativePromptInversionPipeline(  # the rows time NPI, as they are labelled
            **self.components, safety_checker=None, feature_extractor=None, inversion_method="npi"
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.mode = None
        self.log("models built")
        self.work, self.peak, self.attention = prepare_run(
            self.pipe, args, self.device, self.dtype, self.meta, self.log
        )

    def log(self, message: str) -> None:
        if self.state.is_main_process:
            log(message)

    @staticmethod
    def load_baseline(path: Path | None) -> dict:
        """edits/s of a 1-process run per (mode, batch size)."""
        if path is None:
            return {}
        rows = json.loads(Path(path).read_text())["rows"]
        return {(row["mode"], row["batch_size"]): row["edits_per_s"] for row in rows if row.get("edits_per_s")}

    def time_is_up(self) -> bool:
        """Past the budget on any process: all processes must take the same decision, or barriers would hang."""
        return any(gather_object([time.perf_counter() > self.deadline]))

    # ---- one row ---------------------------------------------------------------------------------------------------

    def edit_batch(self, batch: int):
        """What one timed run does: invert the batch, then edit every image toward its own target."""
        args = self.args
        images, sources, targets, p2p = edit_inputs(batch, args.size)

        def run():
            inversion = self.pipe.invert(
                images, sources, num_inference_steps=args.steps, height=args.size, width=args.size
            )
            return self.pipe(prompt=targets, inversion=inversion, attention_control=p2p, output_type="pil")

        return run

    def measure_row(self, mode: str, batch: int) -> dict:
        """This process's timings of one row: all processes start every run together."""
        args = self.args
        if self.mode != mode:
            set_pipeline_mode(self.pipe, mode)
            self.mode = mode
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        components = None if self.work is None else functools.partial(ComponentTimer, self.pipe, self.device)
        stats = measure(
            self.edit_batch(batch),
            args.repeats,
            args.warmup,
            self.device,
            self.pipe.count_unet_calls,
            before_run=self.state.wait_for_everyone,
            components=components,
        )
        stats.pop("result")
        row = {**stats, **summarize_calls(stats.pop("counts"))}
        if mode in COMPILE_MODES:
            row["compile_stats"] = compile_stats()  # the process's totals so far
        return {**row, **row_utilisation(row, self.work, self.peak, self.attention)}

    def run_row(self, mode: str, batch: int) -> None:
        row = {"mode": mode, "batch_size": batch, "processes": self.world, "median_s": None, "error": None}
        if self.time_is_up():
            row["error"] = f"skipped: time budget of {self.args.time_budget:.0f}s spent"
        else:
            self.log(f"{mode}, batch {batch} ...")
            try:
                row.update(self.measure_row(mode, batch))
            except Exception as error:  # noqa: BLE001  (on several processes an error on one can hang the others)
                row["error"] = f"{type(error).__name__}: {error}"
                row["traceback"] = traceback.format_exc()
        per_process = gather_object([{k: row.get(k) for k in ("median_s", "peak_mem_gib", "error")}])
        row.update(aggregate(per_process, batch, self.baseline.get((mode, batch))))
        self.rows.append(row)
        if row.get("edits_per_s"):
            self.log(
                f"  {row['median_s']:.3f} s/batch → {row['edits_per_s']:.2f} edits/s"
                + (f" (all {self.world} processes: {row['aggregate_edits_per_s']:.2f})" if self.world > 1 else "")
                + f"; first call {row['warmup_times_s'][0]:.1f} s" * bool(row.get("warmup_times_s"))
            )
            if row.get("unet_tflops") is not None:
                rate, share = format_utilisation(row)
                self.log(f"  UNet {rate} TFLOP/s, {share} of peak; {format_breakdown(row)}")
        else:
            self.log(f"  {row['error']}")
        self.write()

    # ---- row groups ------------------------------------------------------------------------------------------------

    def mode_rows(self, mode: str) -> None:
        """Every batch size in one mode; graphs and compiled code persist across them, as across a user's calls."""
        for batch in self.args.batch_sizes:
            self.run_row(mode, batch)

    # ---- output ----------------------------------------------------------------------------------------------------

    def write(self) -> str:
        if not self.state.is_main_process:
            return ""
        self.meta["elapsed_s"] = time.perf_counter() - self.started
        out = self.args.out
        tmp = out / "batch.json.tmp"
        tmp.write_text(json.dumps({"metadata": self.meta, "rows": self.rows}, indent=2, default=str))
        os.replace(tmp, out / "batch.json")
        table = markdown(self.meta, self.rows)
        (out / "batch.md").write_text(table)
        return table

    def finish(self) -> int:
        table = self.write()
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            log(f"wrote {self.args.out / 'batch.json'} and {self.args.out / 'batch.md'}")
            print(flush=True)
            print(table, flush=True)
        return 0


def aggregate(per_process: list[dict], batch: int, baseline: float | None) -> dict:
    """Rank 0's view of a row: edits/s of the slowest process × the process count, and scaling against a baseline."""
    errors = [p["error"] for p in per_process if p["error"]]
    if errors:
        return {"error": errors[0]}
    slowest = max(p["median_s"] for p in per_process)
    result = {
        "edits_per_s": batch / per_process[0]["median_s"],
        "median_s_per_process": [p["median_s"] for p in per_process],
        "peak_mem_gib_per_process": [p["peak_mem_gib"] for p in per_process],
        "aggregate_edits_per_s": len(per_process) * batch / slowest,
    }
    if baseline:
        result["baseline_edits_per_s"] = baseline
        result["scaling_vs_baseline"] = result["aggregate_edits_per_s"] / baseline
    return result


def markdown(meta: dict, rows: list[dict]) -> str:
    world = meta["processes"]
    lines = [
        f"## Batch-editing throughput on {meta['device_name']}" + (f" × {world} processes" if world > 1 else ""),
        "",
        f"{meta['model']} model, random weights, {meta['dtype']}, {meta['size']}×{meta['size']} px. One run = "
        f"NPI invert ({meta['steps']} steps) + P2P word-swap edit with local blend ({meta['steps']} steps, VAE decode "
        f"to PIL) of one batch, one target per image. Median of {meta['repeats']} timed run(s) after "
        f"{meta['warmup']} warm-up run(s). torch {meta['torch']}, diffusers {meta['diffusers']}"
        + (f", CUDA {meta['cuda']}" if meta.get("cuda") else "")
        + f", commit {meta['git_commit']}.",
        "",
    ]
    if world > 1:
        lines += [
            (
                f"Aggregate edits/s = {world} processes × batch / the slowest process's median; every process "
                "drives its own device, and all start each run together (barrier)."
            ),
            "",
        ]
    if meta.get("fp8_linear_layers") is not None:
        lines += [
            f"UNet linear layers in FP8 (`pipe.enable_fp8()`): {meta['fp8_linear_layers']} of "
            f"{meta['linear_layers']}.",
            "",
        ]
    lines += [
        utilisation_note(meta) + (" Columns of rank 0." if world > 1 else ""),
        "",
        (
            "| Mode | Batch | Median s/batch | Edits/s (1 process) | Aggregate edits/s | Scaling vs baseline | "
            "First call s | UNet TFLOP/s | % peak | Breakdown s | Peak GiB | UNet calls | Samples/call | Notes |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for row in rows:

        def number(key, fmt="{:.2f}", row=row):
            return fmt.format(row[key]) if row.get(key) is not None else "—"

        first = f"{row['warmup_times_s'][0]:.1f}" if row.get("warmup_times_s") else "—"
        scaling = number("scaling_vs_baseline", "{:.2f}×")
        notes = (row.get("error") or "")[:200].replace("|", "/")
        rate, share = format_utilisation(row)
        lines.append(
            f"| {row['mode']} | {row['batch_size']} | {number('median_s', '{:.3f}')} | {number('edits_per_s')} | "
            f"{number('aggregate_edits_per_s')} | {scaling} | {first} | {rate} | {share} | {format_breakdown(row)} | "
            f"{number('peak_mem_gib')} | {row.get('unet_calls') or '—'} | "
            f"{format_per_call(row.get('samples_per_call'))} | {notes} |"
        )
    best = max(
        (row for row in rows if row.get("aggregate_edits_per_s")),
        key=lambda r: r["aggregate_edits_per_s"],
        default=None,
    )
    lines.append("")
    if best:
        lines.append(
            f"Best: {best['aggregate_edits_per_s']:.2f} edits/s ({best['mode']}, batch {best['batch_size']}"
            f"{f', {world} processes' if world > 1 else ''}). Targets of the batch-editing issue: ≥ "
            f"{TARGET_EDITS_PER_S} edits/s on one H200; 2 GPUs ≥ {TARGET_SCALING_2_GPUS}× one."
        )
    if not meta["device"].startswith("cuda"):
        lines.append("On a CPU `enable_cuda_graphs` does nothing: every mode runs eagerly.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    diffusers_logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    bench = BatchBenchmark(args)
    for mode in args.modes:
        bench.mode_rows(mode)
    return bench.finish()


if __name__ == "__main__":
    sys.exit(main())
