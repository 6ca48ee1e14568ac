"""``python -m toy_world.score DIR``: ``npi-edit evaluate DIR`` plus the toy world's exact metrics, per edit kind.

``DIR`` is the ``--out`` folder of an ``npi-edit batch`` run over a toy-world PIE-Bench folder (written by
``toy_world.pie_bench.write_pie_bench``, whose ground truth lies beside its manifest). The product's evaluation
(``negative_prompt_inversion.cli.evaluate_folder``) scores the background as PIE-Bench does; this module adds the
columns only the toy world can measure, against the true edited image, and writes ``DIR/toy_metrics.json``::

    python3 -c "from toy_world.pie_bench import write_pie_bench; write_pie_bench('outputs/pie_toy', 8)"
    npi-edit batch outputs/pie_toy/mapping_file.json --out outputs/pie_toy_p2p --p2p
    python -m toy_world.score outputs/pie_toy_p2p
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from negative_prompt_inversion import cli
from negative_prompt_inversion.pie_bench import BACKGROUND_COLUMNS, Column

from .pie_bench import read_truth, toy_metrics


TOY_COLUMNS = (
    Column(
        "edit_psnr", "edit PSNR", "PSNR (dB) of the edit against the toy world's true edited image; higher = closer"
    ),
    Column(
        "unedited_psnr_exact",
        "unedited PSNR",
        "PSNR (dB) against the source over the pixels the true edit leaves unchanged (the exact region, no border)",
    ),
    Column(
        "attribute_ok",
        "attribute %",
        "edits whose edited object (or background) has the target's colour,"
        " shape and pattern, by the toy world's judge",
        100,
        1,
    ),
    Column(
        "objects_kept",
        "objects kept %",
        "edits that keep every object of the scene exactly once, in its colour"
        " and shape, at its place (nothing lost, nothing duplicated)",
        100,
        1,
    ),
)


def score(folder) -> dict:
    """Score a batch folder over a toy-world PIE-Bench folder; prints the table and returns the metrics."""
    recorded = Path(folder) / "batch.json"
    manifest = Path(json.loads(recorded.read_text())["manifest"]) if recorded.is_file() else None
    truth = read_truth(manifest.parent) if manifest else {}
    if manifest and not truth:
        raise cli.UsageError(f"DIR: its manifest {manifest} has no toy-world truth beside it (toy_world_truth.json)")
    return cli.evaluate_folder(
        folder,
        columns=BACKGROUND_COLUMNS + TOY_COLUMNS,
        extra=lambda item, edited: toy_metrics(edited, truth[item.id]),
        metrics_file="toy_metrics.json",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m toy_world.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="the --out folder of `npi-edit batch` over a toy-world PIE-Bench folder")
    args = parser.parse_args(argv)
    try:
        score(args.dir)
    except cli.UsageError as error:
        raise SystemExit(f"{parser.prog}: error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
