"""Nothing in the repository links outside it: a clone must stand alone (no path to the shared
folder beside the checkout)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[2]
# [text](target) and ![alt](target); reference-style definitions `[id]: target`.
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
DEFINITION = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
LOCAL_HOSTS = re.compile(r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)")
# Paths of the machine this project was started on; they do not exist in a clone.
# Spelled in pieces so that this file does not itself match a scan for such links.
_UP, _SHARED = r"\.\./", "shared/"
FOREIGN_PATH = re.compile(r"(?<![\w.])(" + _UP + _SHARED + r"|/work/(shared|wt|main)\b)")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / name for name in out.decode().split("\0") if name]
    return [f for f in files if f.is_file() and not f.is_symlink()]


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def anchors(markdown: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", markdown.read_text(), re.M)}


def broken_links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    problems = []
    for target in INLINE.findall(text) + DEFINITION.findall(text):
        if target.startswith("mailto:") or LOCAL_HOSTS.match(target):
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            problems.append(f"{target} (outside the repository)")
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
        if file_part.startswith("/") or not resolved.is_relative_to(REPO):
            problems.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target} (no such heading)")
    return problems


def test_markdown_links_stay_inside_the_repository() -> None:
    markdown = [f for f in tracked_files() if f.suffix == ".md"]
    assert REPO / "README.md" in markdown and REPO / "docs" / "operations.md" in markdown
    broken = {str(f.relative_to(REPO)): p for f in markdown if (p := broken_links(f))}
    assert not broken, broken


def test_no_file_refers_to_paths_outside_the_repository() -> None:
    offenders = []
    for path in tracked_files():
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in FOREIGN_PATH.finditer(text)]
    assert not offenders, offenders


def test_the_checker_sees_a_link_outside() -> None:
    """The rules above are not vacuous: each kind of bad link is reported."""
    page = REPO / "docs" / "__probe__.md"
    page.write_text("[a](" + "../../" + "shared/RUNBOOK.md) [b](https://example.org/x) [c](settings.md#nope)"
                    " [d](missing.md) [e](settings.md) [f](operations.md#backup-and-restore)\n")
    try:
        problems = broken_links(page)
    finally:
        page.unlink()
    assert len(problems) == 4, problems
