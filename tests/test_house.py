"""How the code reads, held to its targets: short docstring sentences, no machine's figures
in prose, no issue numbers, each tolerance literal written once (tests/house.py counts)."""

import os

from tests import house
from tests.conftest import ROOT

CODE = house.python_files("batching", "models")
MEAN_SENTENCE_WORDS = 12
MAX_SENTENCE_WORDS = 40


def test_the_counters_see_what_they_count():
    assert house.FIGURE.search("a call costs 137 µs here")
    assert house.FIGURE.search("26.9 GB/s on this host")
    assert not house.FIGURE.search("x_BxLxD is [B, L, D]")
    assert house.ISSUE.search("the targets of issue 18")
    assert not house.ISSUE.search("jax-ml/jax#1234 (a known bug)")
    assert house.sentences("One. Two words. A real sentence here! And more of it?") == [
        "A real sentence here!",
        "And more of it?",
    ]
    assert house.repeated_tolerances([f"{ROOT}/tests/data/no_such_file.py"]) == {}


def test_docstring_sentences_are_short():
    lengths = house.sentence_lengths(CODE)
    words = [n for _, _, n, _ in lengths]
    assert len(words) > 500
    mean = sum(words) / len(words)
    long = [f"{f}:{line} ({n})" for f, line, n, _ in lengths if n > MAX_SENTENCE_WORDS]
    assert mean <= MEAN_SENTENCE_WORDS, f"mean {mean:.1f} words: python -m tests.house"
    assert not long, long


def test_no_machine_figures_in_code_prose():
    assert not house.machine_figures(CODE)


def test_no_issue_numbers():
    texts = house.python_files("batching", "models", "configs", "experiments")
    texts.append(os.path.join(ROOT, "README.md"))
    docs = os.path.join(ROOT, "docs")
    texts += [os.path.join(docs, f) for f in sorted(os.listdir(docs)) if f.endswith(".md")]
    assert not house.issue_numbers(texts)


def test_each_tolerance_literal_is_written_once():
    assert not house.repeated_tolerances(CODE)
