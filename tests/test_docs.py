"""The README and docs/ stay true to the tree: every relative link and #anchor resolves, every pointer to the docs
from the code names a page (and section) that exists, and the README stays short enough to finish.

Anchors follow GitHub's rule for headings: the heading's text (inline code and emphasis marks dropped, a link's
text kept), lowercased, punctuation dropped, spaces turned into '-', and a repeated heading suffixed -1, -2, ...
A pointer from code is written `docs/PAGE.md` or `docs/PAGE.md#anchor` (or `README.md#anchor`): a bare "README",
or a section named only in words, cannot be checked and is refused."""

import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 250  # lines: what it is, the two commands, the workflow, the map, where to read on

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# A docs pointer in code: docs/PAGE.md or README.md, each optionally with #anchor; and a bare README word.
CODE_POINTER = re.compile(r"\b((?:docs/[\w.-]+\.md|README\.md)(?:#[\w-]+)?)")
BARE_README = re.compile(r"\bREADME\b(?!\.md)")
SKIPPED_DIRS = {".git", ".venv", "models", "work_dirs", "node_modules", "__pycache__", ".pytest_cache"}


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path):
    """(line number, target) of every link and image in the page's prose (not in code spans or blocks)."""
    for n, line in prose_lines(page.read_text(encoding="utf-8")):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            yield n, m.group(1)


def broken(page: Path, target: str) -> str | None:
    """Why a link from `page` to `target` does not resolve, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ... are not checked here
        return None
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{path}: no such file"
    if not dest.resolve().is_relative_to(ROOT):
        return f"{path}: outside the repository"
    if anchor:
        if dest.suffix != ".md" or dest.is_dir():
            return f"#{anchor}: {path} is not a Markdown page"
        if anchor not in anchors(dest):
            return f"#{anchor}: no such heading in {dest.relative_to(ROOT)}"
    return None


def check_links(pages: list[Path]) -> list[str]:
    problems = []
    for page in pages:
        for n, target in links(page):
            why = broken(page, target)
            if why:
                problems.append(f"{page.relative_to(ROOT)}:{n}: ({target}) {why}")
    return problems


def code_files():
    for path in sorted(ROOT.rglob("*")):
        if SKIPPED_DIRS.intersection(path.relative_to(ROOT).parts) or not path.is_file():
            continue
        if path.suffix == ".py" or (path.suffix in (".yaml", ".yml", ".sh") and path.parts[-2] in ("recipes", "bench")):
            yield path


def check_code_pointers(files) -> list[str]:
    problems = []
    for path in files:
        if path == Path(__file__).resolve():
            continue  # this file states the rule
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            for m in CODE_POINTER.finditer(line):
                if m.group(1).startswith("README.md") and "#" not in m.group(1):
                    continue  # a file name (an adapter's README.md), not a pointer into a section
                why = broken(ROOT / "README.md", m.group(1))
                if why:
                    problems.append(f"{where}: {m.group(1)}: {why}")
            if BARE_README.search(line):
                problems.append(f"{where}: names the README without a page and section "
                                f"(write docs/PAGE.md#anchor): {line.strip()}")
    return problems


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_LIMIT, f"README.md has {lines} lines (at most {README_LIMIT}): move detail into docs/"


def test_every_link_and_anchor_resolves():
    pages = doc_pages()
    assert len(pages) > 2, "docs/ has no pages"
    problems = check_links(pages)
    assert not problems, "\n".join(problems)


def test_every_page_is_in_the_index():
    index = {target.partition("#")[0] for _, target in links(ROOT / "docs" / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "README.md" and p.name not in index]
    assert missing == [], f"docs/README.md does not list {missing}"


def test_code_pointers_name_pages_and_sections_that_exist():
    problems = check_code_pointers(code_files())
    assert not problems, "\n".join(problems)


def test_slug_follows_githubs_rule():
    assert slug("Long conversations: `data.truncation`") == "long-conversations-datatruncation"
    assert slug("Converting checkpoints: `convert.py`") == "converting-checkpoints-convertpy"
    assert slug("GGUF, Ollama, llama.cpp") == "gguf-ollama-llamacpp"
    assert slug("The eager core: `split_products`") == "the-eager-core-split_products"
    assert slug("Fast paths: faster steps, same loss") == "fast-paths-faster-steps-same-loss"


def test_the_checks_catch_what_is_broken(tmp_path, monkeypatch):
    """A missing file, a missing heading and a vague README pointer are each reported (the checks can fail)."""
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)  # resolve against a tree of our own
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Top\n\n## Two commands\n\n[ok](docs/a.md#a-section) [gone](docs/b.md)\n"
                                        "[no heading](docs/a.md#nothing) [self](#two-commands)\n"
                                        "```\n[in a code block](nowhere.md)\n```\n`[in a span](nowhere.md)`\n")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## A section\n\n[back](../README.md#top) [bad](../README.md#bottom)\n")
    problems = check_links([tmp_path / "README.md", tmp_path / "docs" / "a.md"])
    assert problems == ["README.md:5: (docs/b.md) docs/b.md: no such file",
                        "README.md:6: (docs/a.md#nothing) #nothing: no such heading in docs/a.md",
                        "docs/a.md:5: (../README.md#bottom) #bottom: no such heading in README.md"]
    code = tmp_path / "x.py"
    code.write_text('# see docs/a.md#a-section and docs/a.md#gone\nraise SystemExit("(README: Decoding)")\n'
                    'Path("adapter") / "README.md"\n')
    problems = check_code_pointers([code])
    assert len(problems) == 2, problems
    assert problems[0].startswith("x.py:1: docs/a.md#gone") and problems[1].startswith("x.py:2: names the README")
