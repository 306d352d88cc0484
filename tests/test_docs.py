"""The repository's docs are self-contained: nothing outside tests/ cites notes that are not in the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Team notes kept beside the checkout, never shipped: what a reader needs of them lives in docs/.
OUTSIDE_NOTES = re.compile(r"\.\./shared|\b(?:PAPER|DESIGN|STYLE)\.md\b")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".ipynb", ".cfg", ".ini", ".sh", ""}


def tracked_files() -> list[Path]:
    """Tracked files (git ls-files) or, outside a git checkout, every file under the repository root."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    return [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


def citations(files: list[Path], root: Path = ROOT) -> list[str]:
    """``path:line: text`` for every line citing the outside notes, in text files outside ``root/tests``."""
    found = []
    for path in files:
        rel = path.relative_to(root)
        if rel.parts[0] == "tests" or path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_NOTES.search(line):
                found.append(f"{rel}:{number}: {line.strip()}")
    return found


def test_no_file_outside_tests_cites_notes_that_are_not_in_the_repository():
    assert citations(tracked_files()) == []


@pytest.mark.parametrize("line", ["(PAPER.md §2.2)", "see DESIGN.md", "STYLE.md rule 4",
                                  "${oc.env:UNCLIP_EMOJI_ROOT,../shared/data/emoji}"])
def test_the_check_catches_each_kind_of_citation(tmp_path, line):
    conf = tmp_path / "conf" / "x.yaml"
    conf.parent.mkdir()
    conf.write_text(f"a: 1\n# {line}\n")
    tests_file = tmp_path / "tests" / "t.py"
    tests_file.parent.mkdir()
    tests_file.write_text(f"# {line}\n")  # tests may name them (this file does)
    assert citations([conf, tests_file], root=tmp_path) == [f"conf/x.yaml:2: # {line}"]


def test_the_pages_that_replace_the_notes_exist():
    for page in ("design.md", "paper.md"):
        assert (ROOT / "docs" / page).is_file(), page
    assert "arxiv.org/abs/2204.06125" in (ROOT / "docs" / "paper.md").read_text()
