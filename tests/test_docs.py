"""The figures the README, the report and the Jetson guide state are the ones BENCHMARKS.md records (those a test can
trace): each headline figure below appears, with the words that place it, both where it is claimed and in
BENCHMARKS.md; a projection is called one wherever it is quoted."""

import re

import pytest
from conftest import ROOT

pytestmark = pytest.mark.unit

DOCS = {
    name: (ROOT / name).read_text() for name in ("README.md", "docs/REPORT.md", "docs/JETSON.md")
}
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text()

# (figure as the docs write it, the document claiming it, a BENCHMARKS.md pattern recording it)
FIGURES = [
    ("19.4 s", "README.md", r"generate bs=32 19\.39 s"),
    ("84–184 s", "README.md", r"\b84\b.*\b184\b|\b184\b"),
    (
        "~37 s kernel by kernel",
        "README.md",
        r"\| W1 scripted \(H200\) \| 29 \| 41\.48 \| \*\*37\.28\*\*",
    ),
    ("~41 s with", "README.md", r"\| W1 scripted \(H200\) \| 29 \| 41\.48 \|"),
    ("~45 s with eager", "README.md", r"\| W1 scripted \| 29 \| 44\.92 \|"),
    (
        "~37 s** with the CUDA extension",
        "docs/JETSON.md",
        r"\*\*37\.28\*\* \| 1\.276 → \*\*1\.147\*\*",
    ),
    ("~41 s with the padded", "docs/JETSON.md", r"\| 41\.48 \| \*\*37\.28\*\*"),
    ("~45 s", "docs/JETSON.md", r"\| 45\.0 \| 32\.5 \|"),
    ("32.5 s", "docs/JETSON.md", r"floor of 32\.5 s|32\.5"),
    ("5,196 KV tokens", "README.md", r"5,196 KV tokens"),
    ("28.46 GiB", "README.md", r"28\.46"),
    ("70/100", "README.md", r"\| bfloat16 \| 70 / 100"),
    ("74/100", "README.md", r"74 / 100"),
    ("1.04", "docs/JETSON.md", r"\*\*1\.04 GiB"),
]


@pytest.mark.parametrize(
    "figure, document, recorded", FIGURES, ids=[f"{d}: {f}" for f, d, _ in FIGURES]
)
def test_a_stated_figure_is_a_recorded_one(figure, document, recorded):
    assert figure in DOCS[document]
    assert re.search(recorded, BENCHMARKS), f"{figure} ({document}) is not in BENCHMARKS.md"


def test_an_orin_figure_is_called_a_projection_where_it_is_quoted():
    for name, text in DOCS.items():
        for match in re.finditer(r"~(26|33|37|40|41|45) s", text):
            around = text[max(0, match.start() - 400) : match.end() + 200].lower()
            assert "projection" in around, (
                f"{name}: {text[match.start() - 80 : match.end() + 40]!r}"
            )
