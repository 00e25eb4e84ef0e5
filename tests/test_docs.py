"""The README and docs/ stay short, linked and true to the files they name.

The README is the front page (what the lab is, its two commands, what a run writes); each
topic has one page in docs/, linked from it. Measured figures of one machine live with that
machine's results (experiments/results/<device>/README.md), not in these pages.
"""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = [README, *DOCS]
# The results pages link into docs/ too.
RESULTS_READMES = sorted(glob.glob(os.path.join(ROOT, "experiments", "results", "*", "README.md")))

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
ISSUE_NUMBER = re.compile(r"\bissues?\s+#?\d+", re.I)
MACHINE_TALK = re.compile(r"2-core|\bVM\b")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where `[x](y)` is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: str) -> list[str]:
    return LINK.findall(prose(read(path)))


def anchors(path: str) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped."""
    out = set()
    for line in FENCE.sub("", read(path)).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().replace("\\", "").replace("`", "")
            out.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return out


def test_there_are_docs_pages():
    assert DOCS, "no docs/*.md"
    assert os.path.join(ROOT, "docs", "results.md") in DOCS


def test_readme_is_at_most_200_lines():
    n = len(read(README).splitlines())
    assert n <= 200, f"README.md has {n} lines; move a topic to docs/"


def test_docs_pages_are_at_most_250_lines():
    long = {rel(p): n for p in DOCS if (n := len(read(p).splitlines())) > 250}
    assert not long, f"pages over 250 lines (split them by topic): {long}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(os.path.join(ROOT, t.split("#")[0])) for t in links(README)}
    missing = [rel(p) for p in DOCS if os.path.normpath(p) not in linked]
    assert not missing, f"README.md links none of {missing}"


def test_relative_links_point_to_existing_files():
    broken = []
    for page in [*PAGES, *RESULTS_READMES]:
        for target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if not os.path.exists(dest):
                broken.append(f"{rel(page)}: {target}")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                broken.append(f"{rel(page)}: {target} (no such heading)")
    assert not broken, broken


def test_readme_first_code_block_holds_the_two_commands():
    # CI and users copy these two lines: install and run the main job; install and test.
    block = FENCE.search(read(README)).group(0).splitlines()
    assert any(
        re.search(r"pip install -e \.(\s|$)", line)
        and "python main.py --config=configs/mlp.py" in line
        for line in block
    ), block
    assert any(
        "pip install -e '.[test]'" in line and "python -m pytest" in line for line in block
    ), block


def test_no_issue_numbers():
    hits = [
        f"{rel(p)}: {line}"
        for p in PAGES
        for line in read(p).splitlines()
        if ISSUE_NUMBER.search(line)
    ]
    assert not hits, f"issue numbers, which readers of the repository cannot see: {hits}"


def test_one_machines_talk_points_to_its_results():
    # A line about the development machine links where its measurements live.
    hits = [
        f"{rel(p)}: {line}"
        for p in PAGES
        for line in read(p).splitlines()
        if MACHINE_TALK.search(line) and "experiments/results/" not in line
    ]
    assert not hits, f"say it in experiments/results/<device>/README.md: {hits}"
