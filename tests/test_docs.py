"""The docs stay true to the code: the generated configuration table and every relative link."""

import re
from pathlib import Path

import config
from conftest import ROOT

CONFIG_DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- generated: python config.py --markdown -->"
END = "<!-- end generated -->"
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title") or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def generated_table(text: str) -> str:
    """The text between the two marker lines, without the blank lines around it."""
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{CONFIG_DOC} needs one {BEGIN!r} and one {END!r} line"
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    assert start < end, f"{BEGIN!r} must come before {END!r} in {CONFIG_DOC}"
    return text[start:end].strip("\n")


def relative_links(markdown: str) -> list[str]:
    """Link targets that name a file of this repository: no URL, no mailto, no bare #anchor; code blocks skipped."""
    targets = []
    for target in LINK.findall(FENCE.sub("", markdown)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def test_configuration_table_matches_config_py():
    documented = generated_table(CONFIG_DOC.read_text())
    assert documented == config.markdown_table(), (
        "docs/configuration.md's settings table differs from config.py. Regenerate it: run "
        "`.venv/bin/python config.py --markdown` and paste the output between the lines "
        f"{BEGIN!r} and {END!r} in docs/configuration.md")


def test_link_finder_reads_files_images_and_anchors_but_not_urls_or_code():
    text = ("see [data](docs/data.md#folder-layout), ![grid](prediction_grid.png), [top](#outputs), "
            "[web](https://example.org/x.md), [mail](mailto:a@b.c)\n```\n[not a link](nowhere.md)\n```\n")
    assert relative_links(text) == ["docs/data.md", "prediction_grid.png"]


def test_every_relative_link_in_the_docs_points_at_a_file():
    broken = []
    for doc in doc_files():
        for target in relative_links(doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: ({target})")
    assert not broken, "links to files that do not exist:\n  " + "\n  ".join(broken)
