"""The documentation cites only what a clone of the repository has.

* every relative Markdown link and every backticked repository path in README.md and docs/*.md
  resolves to a file (or folder) of the repository, and every `docs/X.md` named anywhere in them or
  in the package's sources exists;
* every section cited as "docs/PAPER.md §N" / "STORAGE.md §N" exists in that page;
* README.md and docs/*.md never send the reader to ../shared (material beside the checkout that
  a user does not have), nor to the design notes kept there;
* every `llmflash VERB` at the start of a line of README's command blocks is a verb that
  `llmflash --help` lists.

Fast: text only, plus one `llmflash --help` subprocess.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmflash"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted(PACKAGE.rglob("*.py"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
DOC_NAME = re.compile(r"(?<![\w./-])docs/[A-Za-z0-9_-]+\.md\b")
# "docs/PAPER.md §3", "PAPER.md §3-§6", "[STORAGE.md](STORAGE.md) §2, §6, §7"
SECTION_CITE = re.compile(r"\b(PAPER|STORAGE)\.md(?:\]\([^)]*\))?((?:\s*(?:,|-|–|and)?\s*§\d+)+)")
SHARED_PAGES = ("DESIGN.md", "PEERS.md")
# Pages that code already cites while their author is still writing them (this session's server
# work). Remove an entry as soon as the page is committed; nothing else belongs here.
PENDING = {"docs/SERVE.md"}
# A placeholder or something outside the repository, not a path to check.
NOT_A_PATH = re.compile(r"[\s~$*<>{}|=]|^/|^\.|^https?:|\.\.")


def without_fences(text: str) -> str:
    """The text with fenced code blocks blanked (line numbers kept)."""
    return re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


def top_level_entries() -> set[str]:
    return {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}


def subpackages() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def path_candidates(token: str, doc: Path) -> list[Path] | None:
    """Where a backticked token would be if it names a repository file, or None if it does not
    look like one. Tokens look like repository paths when they start with a top-level entry of the
    repository (`docs/X.md`, `llmflash/...`, `tests/...`), with a subpackage of llmflash (the docs'
    short form `runtime/reader.py`), or name a Python or Markdown file with a folder (`x/y.py`)."""
    token = token.split(":", 1)[0].split("#", 1)[0]  # `runtime/ffn.py:activate`, `X.md#anchor`
    if not token or NOT_A_PATH.search(token):
        return None
    first = token.split("/", 1)[0]
    if "/" in token and first in top_level_entries() and not (ROOT / first).is_file():
        return [ROOT / token]
    if "/" in token and first in subpackages():
        # `runtime/sampling.check_sampling`: a module's attribute
        return [PACKAGE / token, PACKAGE / re.sub(r"\.[A-Za-z_]\w*$", ".py", token)]
    if "/" in token and token.endswith(".py"):
        return [ROOT / token, PACKAGE / token]
    if "/" not in token and re.fullmatch(r"[A-Z][A-Z0-9_]*\.md", token):
        return [doc.parent / token, ROOT / token, ROOT / "docs" / token]
    return None


def where(doc: Path, text: str, pos: int) -> str:
    return f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, pos) + 1}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = without_fences(doc.read_text())
    missing = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, an anchor in the same page
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            missing.append(f"{where(doc, text, m.start())}: link to {target}")
    assert not missing, "links to files the repository does not have:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_paths_exist(doc):
    text = without_fences(doc.read_text())
    missing = []
    for m in INLINE_CODE.finditer(text):
        candidates = path_candidates(m.group(1).strip(), doc)
        if candidates is not None and not any(p.exists() for p in candidates):
            missing.append(f"{where(doc, text, m.start())}: `{m.group(1)}`")
    assert not missing, "backticked paths that are not in the repository:\n" + "\n".join(missing)


def test_cited_docs_exist():
    """`docs/X.md` named in plain text (docs, README, the package's docstrings and comments)."""
    missing = []
    for path in [*DOCS, *SOURCES]:
        text = path.read_text()
        for m in DOC_NAME.finditer(text):
            if not (ROOT / m.group(0)).is_file() and m.group(0) not in PENDING:
                missing.append(f"{where(path, text, m.start())}: {m.group(0)}")
    assert not missing, "cited pages that docs/ does not have:\n" + "\n".join(missing)


def sections(page: str) -> set[int]:
    text = (ROOT / "docs" / f"{page}.md").read_text()
    return {int(n) for n in re.findall(r"^#+\s*§(\d+)\b", text, re.M)}


def test_cited_sections_exist():
    have = {page: sections(page) for page in ("PAPER", "STORAGE")}
    assert have["PAPER"] >= set(range(1, 8)) and have["STORAGE"] >= set(range(1, 9))
    bad = []
    for path in [*DOCS, *SOURCES]:
        text = path.read_text()
        for m in SECTION_CITE.finditer(text):
            for n in map(int, re.findall(r"§(\d+)", m.group(2))):
                if n not in have[m.group(1)]:
                    bad.append(f"{where(path, text, m.start())}: {m.group(1)}.md §{n}")
    assert not bad, "cited sections that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(doc):
    text = doc.read_text()
    bad = [f"{where(doc, text, m.start())}: {m.group(0)}"
           for m in re.finditer(r"\.\./shared\b[^\s`)]*", text)]
    bad += [f"{where(doc, text, m.start())}: {m.group(0)}"
            for m in re.finditer("|".join(map(re.escape, SHARED_PAGES)), text)]
    assert not bad, "references to material a clone does not have:\n" + "\n".join(bad)


def test_package_sources_do_not_cite_shared():
    bad = []
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(r"\.\./shared\b|" + "|".join(map(re.escape, SHARED_PAGES)), text):
            bad.append(f"{where(path, text, m.start())}: {m.group(0)}")
    assert not bad, "the package cites material a clone does not have:\n" + "\n".join(bad)


def listed_verbs() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "llmflash", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    commands = out.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    verbs = set(re.findall(r"^ {4}([a-z][a-z0-9-]*)(?:\s|$)", commands, re.M))
    assert {"generate", "convert"} <= verbs, out.stdout
    return verbs


def test_readme_commands_are_listed_verbs():
    text = (ROOT / "README.md").read_text()
    used = {}
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
        for line in block.splitlines():
            m = re.match(r"\s*(?:\$\s*)?llmflash\s+([A-Za-z][\w-]*)", line)
            if m:
                used.setdefault(m.group(1), line.strip())
    assert used, "README has no `llmflash VERB` command lines"
    unknown = {verb: line for verb, line in used.items() if verb not in listed_verbs()}
    assert not unknown, f"README commands whose verb `llmflash --help` does not list: {unknown}"
