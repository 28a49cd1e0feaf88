#!/usr/bin/env python3
"""Fails when a file of the repository points outside it or at a file it does not have.

A fresh clone holds nothing beside it, so every path a test, script, scenario or doc follows
must resolve inside the checkout. Checked over every file git tracks (and new ones it does not
ignore):

- a relative path that climbs (`../...`) must stay inside the repository when resolved from the
  file's own folder;
- a Markdown link to a relative path must name a file or folder that exists;
- no file names the folder of reference material that sits beside a developer's checkout, nor
  the design document by its old name (the design lives in docs/design.md).

Usage: python3 scripts/check-repo-paths.py   (exit status 1 and one line per finding)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Built from parts so that this file does not flag itself.
FORBIDDEN = ("../" + "shared", "DESIGN" + ".md")
CLIMB = re.compile(r"(?<![\w./-])((?:\.\./)+[\w][\w.-]*(?:/[\w.-]+)*)")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
TEXT_SUFFIXES = {
    ".rs", ".py", ".sh", ".toml", ".md", ".json", ".jsonl", ".yaml", ".yml", ".js", ".html",
    ".css", ".txt", ".cfg", ".ini",
}


def repo_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    names = [n for n in out.split("\0") if n]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def findings(file: Path) -> list[str]:
    if file.suffix not in TEXT_SUFFIXES and file.name not in {"run", "Makefile"}:
        return []
    if file.suffix == ".jsonl":
        return []  # data
    rel = file.relative_to(ROOT)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for word in FORBIDDEN:
            if word in line:
                found.append(f"{rel}:{lineno}: names {word!r}, which a clone does not have")
        for match in CLIMB.finditer(line):
            if not inside(file.parent / match.group(1)):
                found.append(f"{rel}:{lineno}: {match.group(1)!r} leaves the repository")
        if file.suffix == ".md":
            for match in MD_LINK.finditer(line):
                target = match.group(1)
                if "://" in target or target.startswith(("mailto:", "/")):
                    continue
                resolved = file.parent / target
                if not inside(resolved):
                    found.append(f"{rel}:{lineno}: link {target!r} leaves the repository")
                elif not resolved.exists():
                    found.append(f"{rel}:{lineno}: link {target!r} names no file in the repository")
    return found


def main() -> int:
    problems = [line for file in repo_files() for line in findings(file)]
    for line in problems:
        print(line)
    if problems:
        print(f"check-repo-paths: {len(problems)} reference(s) outside the repository")
        return 1
    print("check-repo-paths: every path stays inside the repository")
    return 0


if __name__ == "__main__":
    sys.exit(main())
