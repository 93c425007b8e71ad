"""Every data card carries complete, well-typed YAML front matter, and the required cards exist."""

import re
from pathlib import Path

import pytest
import yaml

CARDS = Path(__file__).resolve().parents[2] / "data_cards"
REQUIRED_CARDS = ("demo", "msrvtt", "webvid", "cc3m", "meta_sets")
STRING_FIELDS = ("name", "source", "paper", "license", "size", "caption_origin", "build")
MODALITIES = ("video", "image", "video+image")


def front_matter(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n"), f"{path.name}: no front matter"
    header, separator, body = text[4:].partition("\n---\n")
    assert separator, f"{path.name}: front matter is not closed by ---"
    assert body.strip(), f"{path.name}: the card has no body"
    meta = yaml.safe_load(header)
    assert isinstance(meta, dict), f"{path.name}: front matter is not a mapping"
    return meta


def card_paths() -> list[Path]:
    return sorted(path for path in CARDS.glob("*.md") if path.name != "README.md")


def test_required_cards_exist():
    assert {path.stem for path in card_paths()} >= set(REQUIRED_CARDS)


@pytest.mark.parametrize("path", card_paths(), ids=lambda path: path.stem)
def test_front_matter_is_complete(path):
    meta = front_matter(path)
    for field in STRING_FIELDS:
        assert isinstance(meta.get(field), str) and meta[field].strip(), f"{path.name}: {field} missing or empty"
    assert meta["modality"] in MODALITIES, f"{path.name}: modality={meta.get('modality')!r}"
    assert isinstance(meta.get("splits"), dict) and meta["splits"], f"{path.name}: splits must be a mapping"
    assert all(isinstance(value, str) and value for value in meta["splits"].values())
    biases = meta.get("known_biases")
    assert isinstance(biases, list) and biases and all(isinstance(item, str) for item in biases)
    assert meta["build"].startswith(("mmsphere ", "python ", "img2dataset ")), f"{path.name}: build command"
    assert "## How to build" in path.read_text(encoding="utf-8"), f"{path.name}: no 'How to build' section"
    assert path.name in (CARDS / "README.md").read_text(encoding="utf-8"), f"{path.name} not linked from README"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", sorted(CARDS.glob("*.md")), ids=lambda path: path.stem)
def test_cards_cite_only_what_the_repository_holds(path):
    text = path.read_text(encoding="utf-8")
    repository = CARDS.parent
    for document in re.findall(r"\b([A-Z]+)(?:\.md)? §", text):
        assert (repository / f"{document}.md").is_file(), f"{path.name} cites {document} §, not in the repository"
    for target, anchor in re.findall(r"\]\((\.\./[^)#]+)#([^)]+)\)", text):
        headings = re.findall(r"^#+ (.+)$", (CARDS / target).read_text(encoding="utf-8"), re.MULTILINE)
        assert anchor in {github_anchor(heading) for heading in headings}, f"{path.name}: {target}#{anchor}"
