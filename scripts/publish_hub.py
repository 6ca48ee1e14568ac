#!/usr/bin/env python
"""Assemble (and optionally upload) the Hugging Face Hub repository of the community pipeline.

A code-only Hub repo that diffusers can load with ``custom_pipeline="<user>/negative-prompt-inversion"`` must hold
the pipeline under the name ``pipeline.py`` at its root, plus every sibling module that file imports relatively.
diffusers finds those siblings by scanning the *main file only* with two regular expressions
(``from .x import`` / ``import .x``), copies ``x.py`` or ``pkg/leaf.py`` (one package level at most), never copies
``pkg/__init__.py`` and never follows a leaf's own relative imports. This script applies the same rules, so what it
writes is exactly what diffusers will fetch, and it refuses layouts that would break on the Hub.

The folder it writes (default ``dist/hub``):

    pipeline.py                              the pipeline, under the name a code-only Hub repo needs
    pipeline_negative_prompt_inversion.py    the same file under its own, unique name (see below)
    attention_processors/npi_*.py            the leaves the pipeline imports
    README.md                                the model card (``model_card.md`` with the repo id filled in)
    publish_info.json                        what was published: class, files, SHA-256s, source commit

Why the second copy: diffusers imports every pipeline loaded from a *local folder* as the same module,
``diffusers_modules.local.pipeline``, so two folder-loaded custom pipelines collide in one process. Pointing
``custom_pipeline`` at ``<snapshot>/pipeline_negative_prompt_inversion.py`` instead gives a module name no other
pipeline uses, and the file is also what copy-paste users take.

Usage:

    python scripts/publish_hub.py                                   # dry run: write dist/hub and list it
    python scripts/publish_hub.py --out /tmp/npi-hub --repo-id me/negative-prompt-inversion
    python scripts/publish_hub.py --push --repo-id me/negative-prompt-inversion   # needs `hf auth login`
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILE = ROOT / "pipeline_negative_prompt_inversion.py"
MODEL_CARD = ROOT / "model_card.md"
PIPELINE_CLASS = "NegativePromptInversionPipeline"
HUB_MAIN_FILE = "pipeline.py"  # diffusers' CUSTOM_PIPELINE_FILE_NAME
INFO_FILE = "publish_info.json"
REPO_ID_PLACEHOLDER = "<user>/negative-prompt-inversion"

# The two patterns of diffusers.utils.dynamic_modules_utils.get_relative_imports, verbatim.
_IMPORT_DOT = re.compile(r"^\s*import\s+\.(\S+)\s*$", flags=re.MULTILINE)
_FROM_DOT = re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.MULTILINE)


class LayoutError(ValueError):
    """The pipeline's relative imports cannot be served by diffusers' custom-pipeline loader."""


def relative_imports(source: str) -> list[str]:
    """Dotted names (without the leading dot) that diffusers would copy for a main file with this source."""
    return sorted(set(_IMPORT_DOT.findall(source)) | set(_FROM_DOT.findall(source)))


def _ast_relative_imports(source: str) -> tuple[set[str], list[str]]:
    """Relative imports as Python sees them: level-1 module names, and the forms diffusers cannot serve."""
    names, unsupported = set(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > 1 or node.module is None:
                dots = "." * node.level
                unsupported.append(f"from {dots}{node.module or ''} import ...")
            else:
                names.add(node.module)
    return names, unsupported


def sibling_files(pipeline_file: Path = PIPELINE_FILE) -> list[str]:
    """Repo-relative paths (``attention_processors/npi_x.py``) of the siblings the pipeline file imports.

    Raises `LayoutError` when diffusers could not load the file from a Hub repo: a relative import that diffusers'
    scan misses or cannot copy (``from . import x``, ``from ..x``, more than one package level), a missing file,
    or a sibling that itself imports relatively (diffusers does not follow those).
    """
    source = pipeline_file.read_text(encoding="utf-8")
    scanned = relative_imports(source)
    parsed, unsupported = _ast_relative_imports(source)
    if unsupported:
        raise LayoutError(f"{pipeline_file.name}: diffusers cannot load {', '.join(unsupported)}")
    if set(scanned) != parsed:
        raise LayoutError(
            f"{pipeline_file.name}: relative imports {sorted(parsed)} differ from what diffusers' scan finds"
            f" {scanned}; write each as a one-line `from .pkg.leaf import ...`."
        )
    files = []
    for dotted in scanned:
        parts = dotted.split(".")
        if len(parts) > 2:
            raise LayoutError(f"{pipeline_file.name}: `.{dotted}` is nested deeper than diffusers copies (pkg.leaf).")
        relative = "/".join(parts) + ".py"
        path = pipeline_file.parent / relative
        if not path.is_file():
            raise LayoutError(f"{pipeline_file.name} imports `.{dotted}` but {relative} does not exist.")
        leaf_source = path.read_text(encoding="utf-8")
        leaf_parsed, leaf_unsupported = _ast_relative_imports(leaf_source)
        if relative_imports(leaf_source) or leaf_parsed or leaf_unsupported:
            raise LayoutError(f"{relative} imports relatively; diffusers does not copy a sibling's own imports.")
        files.append(relative)
    return files


def render_model_card(repo_id: str | None, card: Path = MODEL_CARD) -> str:
    text = card.read_text(encoding="utf-8")
    return text.replace(REPO_ID_PLACEHOLDER, repo_id) if repo_id else text


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def _source_commit(paths: list[Path]) -> dict:
    """The commit the files come from, and whether any of them differ from it (uncommitted edits)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", *map(str, paths)) if commit else None
    return {"source_commit": commit or None, "source_modified": None if status is None else bool(status)}


def _project_version() -> str | None:
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', (ROOT / "__init__.py").read_text(), flags=re.MULTILINE)
    return match.group(1) if match else None


def _prepare_out(out: Path, force: bool) -> None:
    """Empty ``out`` if it is a previous output of this script (or ``force``); never touch other folders."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder.")
        if any(out.iterdir()):
            if not (force or (out / INFO_FILE).is_file()):
                raise FileExistsError(f"{out} is not empty and was not written by this script; pass --force.")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def build_hub_folder(
    out: str | Path = ROOT / "dist" / "hub",
    repo_id: str | None = None,
    pipeline_file: str | Path = PIPELINE_FILE,
    model_card: str | Path = MODEL_CARD,
    force: bool = False,
) -> Path:
    """Write the Hub repository folder (see the module docstring) and return its path."""
    out, pipeline_file = Path(out), Path(pipeline_file)
    siblings = sibling_files(pipeline_file)
    _prepare_out(out, force)

    shutil.copyfile(pipeline_file, out / HUB_MAIN_FILE)
    shutil.copyfile(pipeline_file, out / pipeline_file.name)
    for relative in siblings:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pipeline_file.parent / relative, out / relative)
    (out / "README.md").write_text(render_model_card(repo_id, Path(model_card)), encoding="utf-8")

    files = [HUB_MAIN_FILE, pipeline_file.name, *siblings, "README.md"]
    info = {
        "pipeline_class": PIPELINE_CLASS,
        "main_file": HUB_MAIN_FILE,
        "repo_id": repo_id,
        "version": _project_version(),
        **_source_commit([pipeline_file, *(pipeline_file.parent / relative for relative in siblings)]),
        "files": {name: _sha256(out / name) for name in files},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def push(out: Path, repo_id: str, private: bool, token: str | None, message: str) -> str:
    """Create ``repo_id`` if needed and upload ``out``; removes Python files the new version no longer has."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=out,
        commit_message=message,
        delete_patterns=["*.py", "attention_processors/*.py"],
    )
    return commit.commit_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --push nothing leaves this machine.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "hub", help="folder to write (default: dist/hub)")
    parser.add_argument("--repo-id", help="Hub repo id, e.g. user/negative-prompt-inversion (fills the model card)")
    parser.add_argument("--push", action="store_true", help="upload the folder to --repo-id with huggingface_hub")
    parser.add_argument("--private", action="store_true", help="create the repo as private (with --push)")
    parser.add_argument("--token", help="Hub token (default: the one saved by `hf auth login` / HF_TOKEN)")
    parser.add_argument("--message", default="Upload NegativePromptInversionPipeline", help="commit message")
    parser.add_argument("--force", action="store_true", help="empty --out even if this script did not write it")
    args = parser.parse_args(argv)
    if args.push and not args.repo_id:
        parser.error("--push needs --repo-id")
    if args.repo_id and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repo_id):
        parser.error(f"--repo-id must look like user/name, got {args.repo_id!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = build_hub_folder(args.out, repo_id=args.repo_id, force=args.force)
    except (LayoutError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(path.relative_to(out))
    if args.push:
        print(push(out, args.repo_id, args.private, args.token, args.message))
    else:
        print(f"dry run: wrote {out}; add --push --repo-id user/name to upload it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
