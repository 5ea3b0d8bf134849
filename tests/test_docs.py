"""The documentation holds together: README.md is a short front door that links every page under docs/, and every
relative link or image in README.md, docs/*.md and cluster/README.md points to a file that exists (and, with a
`#anchor`, to a heading of that file). Plain file reads: no Ray, no torch."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "cluster" / "README.md"]

MAX_README_LINES = 260
CONSOLE_MARKERS = ("<!-- console-sample:start -->", "<!-- console-sample:end -->")

# [text](target) and ![alt](target), with an optional "title"; the text may hold inline code
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = ("http://", "https://", "mailto:")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fence = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip()[len(match.group(1)):].strip():
                fence = None
        else:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text lowercased, everything but letters, digits, spaces,
    hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = CODE_SPAN.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "")  # emphasis markers
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code (fenced blocks and inline code spans)."""
    found = []
    for n, line in prose_lines(path):
        # inline code holds no links, but link text may hold inline code: blank the span's content only
        line = CODE_SPAN.sub(lambda m: m.group(1) + "x" * len(m.group(2)) + m.group(1), line)
        found.extend((n, match.group(1)) for match in LINK.finditer(line))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for n, target in links(path):
        if target.startswith(EXTERNAL):
            continue
        where = f"{path.relative_to(ROOT)}:{n}"
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_slug_follows_github():
    assert slug("Studies: Ray Tune + Optuna") == "studies-ray-tune--optuna"
    assert slug("The default study's answer, with tuned baselines") == "the-default-studys-answer-with-tuned-baselines"
    assert slug("One configuration: `python -m ia2ray.run`") == "one-configuration-python--m-ia2rayrun"
    assert slug("snake_case and [a link](x.md)") == "snake_case-and-a-link"


def test_every_relative_link_and_image_resolves():
    assert DOCS, "no pages under docs/"
    problems = [problem for path in PAGES for problem in broken_links(path)]
    assert problems == [], "broken links:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README)
              if not target.startswith(EXTERNAL) and target.partition("#")[0]}
    missing = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in linked]
    assert missing == [], f"docs pages not linked from README.md: {missing}"


def test_readme_has_the_console_sample_markers():
    text = README.read_text()
    start, end = CONSOLE_MARKERS
    assert start in text and end in text, f"README.md lacks the markers {start} / {end}"
    assert text.index(start) < text.index(end)


def test_readme_shows_the_test_commands_ci_runs():
    """`.ci/run` runs the README's test commands: each of its pytest lines is in the README as `python -m pytest`."""
    ci_commands = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        if "run_pytest" not in line or line.lstrip().startswith(("#", "run_pytest()")):
            continue
        words = shlex.split(line, comments=True)
        if "run_pytest" in words:
            at = words.index("run_pytest")
            ci_commands.append(" ".join([*words[:at], "python", "-m", "pytest", *words[at + 1:]]))
    assert len(ci_commands) >= 3
    shown = []
    for line in README.read_text().splitlines():
        if "pytest" not in line:
            continue
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if "pytest" in words:
                shown.append(" ".join(words))
    missing = [command for command in ci_commands if command not in shown]
    assert missing == [], f".ci/run's pytest commands missing from README.md: {missing}"
