"""Documentation points at files that exist: every relative markdown link (and its #anchor) in the repository's
markdown files, and every inline-code path under one of the repository's folders (`benchmarks/...`, written from
the repository root), so that moving or deleting a file cannot leave a README pointing at nothing."""

import ast
import inspect
import re
from pathlib import Path

from conftest import ROOT

from negative_prompt_inversion import NegativePromptInversionPipeline


SKIPPED_DIRS = {".venv", ".git", "build", "dist", "node_modules"}
FOLDERS = ("attention_processors", "benchmarks", "scripts", "tests", "toy_world")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_PATH = re.compile(r"`((?:%s)/[^`\s]*)`" % "|".join(FOLDERS))
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def markdown_files():
    return sorted(
        path
        for path in ROOT.rglob("*.md")
        if not SKIPPED_DIRS & set(path.relative_to(ROOT).parts[:-1])
        and not any(part.startswith(".") or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)
    )


def prose(path: Path) -> str:
    """The file without its fenced code blocks: commands there name outputs still to be written."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose(path), re.MULTILINE):
        text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


def broken_code_paths(path: Path) -> list[str]:
    text = re.sub(r"`{3,}", "", prose(path))
    return [span for span in CODE_PATH.findall(text) if not list(ROOT.glob(span.split("#")[0].split(":")[0]))]


def test_relative_links_and_repository_paths_resolve():
    files = markdown_files()
    assert ROOT / "README.md" in files and ROOT / "model_card.md" in files
    broken = {path.relative_to(ROOT).as_posix(): broken_links(path) + broken_code_paths(path) for path in files}
    assert not {name: problems for name, problems in broken.items() if problems}


def test_the_checker_finds_broken_links_and_paths(tmp_path, monkeypatch):
    (tmp_path / "other.md").write_text("# A heading, with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-code) [gone](missing.md) [anchor](other.md#nope) "
        "[web](https://example.org/x) ![img](other.md)\n`benchmarks/not_there.py` `tests/conftest.py`\n"
        "```\n[in a fence](missing_too.md) `tests/not_either.py`\n```\n"
    )
    assert broken_links(page) == ["missing.md", "other.md#nope (no such heading)"]
    assert broken_code_paths(page) == ["benchmarks/not_there.py"]


def test_the_methods_page_states_the_constructor_defaults_the_code_has():
    """docs/methods.md's table of constructor flags (`name` | values | `default`, several names to a row allowed)
    says what `__init__` defaults to: a default changed in code must change there too."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(NegativePromptInversionPipeline.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    rows = re.findall(
        r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \|.*\| (`[^|]+`) \|$", (ROOT / "docs/methods.md").read_text(), re.M
    )
    documented = {}
    for names, values in rows:
        for name, value in zip(re.findall(r"`([a-z_]+)`", names), re.findall(r"`([^`]+)`", values)):
            documented[name] = ast.literal_eval(value)
    assert "inversion_method" in documented and set(documented) <= set(defaults), documented
    assert documented == {name: defaults[name] for name in documented}
