"""Cards side by side: one column per card, and a warning for every difference that makes numbers incomparable.

Comparing models is the point, so the model may differ; everything that defines the benchmark must
not: the kind of evaluation, the protocol and its version, the list files, the media actually used
(their fingerprint and count, a subset included), and the frames and their sampling (for OoD: the
sets, their fingerprints, the score, its temperature and the FPR@95 convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmsphere.results.card import DIRECTION_LABELS, OOD_METRICS, RETRIEVAL_METRICS, subset_line

SHOWN_CHARACTERS = 48  # longer values (a frame sampling in words) are cut in the table


@dataclass
class Comparison:
    """Rows of ``[label, value of card 1, value of card 2, ...]`` and the warnings, one sentence each."""

    header: list[str]
    rows: list[list[str]]
    warnings: list[str]


def compare_cards(cards: dict[str, dict[str, Any]]) -> Comparison:
    """Compare cards (label -> card): the identity and metric rows, and what differs between them."""
    if len(cards) < 2:
        raise ValueError("compare_cards needs at least two cards")
    labels = list(cards)
    identity = {label: identity_fields(card) for label, card in cards.items()}
    warnings = []
    for key in identity[labels[0]]:
        values = {label: identity[label].get(key) for label in labels}
        if len({repr(value) for value in values.values()}) > 1:
            shown = "; ".join(f"{label}: {_show(value)}" for label, value in values.items())
            warnings.append(f"different {key} ({shown}): the numbers are not comparable")
    for label, card in cards.items():
        subset = subset_line(card)
        if subset:
            warnings.append(f"{label}: {subset}")
    rows = [[key, *(_show(identity[label].get(key)) for label in labels)] for key in identity[labels[0]]]
    rows.append(["model", *(model_name(card) for card in cards.values())])
    rows += metric_rows(cards)
    return Comparison(["", *labels], rows, warnings)


def identity_fields(card: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two cards' numbers to be comparable, by the name printed in a warning."""
    protocol = card.get("protocol") or {}
    fields: dict[str, Any] = {
        "kind": card.get("kind"),
        "protocol": protocol.get("name"),
        "protocol version": protocol.get("version"),
    }
    if card.get("kind") == "retrieval":
        data = card.get("data", {})
        media = data.get("media") or {}
        fields.update({
            "list digest": data.get("list_sha256") or data.get("urls"),
            "media fingerprint": media.get("sha256"),
            "videos evaluated": f"{data.get('n_evaluated', data.get('num_videos'))} of {data.get('n_listed', '?')}",
            "captions": data.get("num_captions"),
            "modality": data.get("modality"),
            "frames": data.get("frames"),
            "frame sampling": data.get("frame_sampling"),
        })
    else:
        sets = {"id": card.get("id", {}), **card.get("ood", {})}
        fields.update({
            "sets": ", ".join(sets),
            **{f"{name} fingerprint": (values.get("media") or {}).get("sha256") for name, values in sets.items()},
            **{f"{name} images": f"{values.get('n_evaluated', values.get('num_samples'))} of "
                                 f"{values.get('n_listed', '?')}" for name, values in sets.items()},
            "score": card.get("score"),
            "temperature": card.get("temperature"),
            "FPR@95 convention": card.get("positive"),
            "classes": len((card.get("classes") or {}).get("names", [])),
        })
    return fields


def model_name(card: dict[str, Any]) -> str:
    """The run directory, or open_clip name and tag, of a card's model."""
    model = card.get("model", {})
    if "run_dir" in model:
        return str(model["run_dir"])
    return f"{model.get('name')} ({model.get('pretrained') or 'no pretrained weights'})"


def metric_rows(cards: dict[str, dict[str, Any]]) -> list[list[str]]:
    """``direction metric`` (retrieval) or ``set metric`` (OoD) rows over the union of the cards' metrics."""
    keys: list[tuple[str, str, str]] = []  # (group, metric, label)
    for card in cards.values():
        if card.get("kind") == "retrieval":
            candidates = [(direction, metric, f"{DIRECTION_LABELS.get(direction, direction)} {metric}")
                          for direction in card.get("metrics", {}) for metric in RETRIEVAL_METRICS]
        else:
            candidates = [(name, metric, f"{name} {label}") for name in card.get("metrics", {})
                          for metric, label in OOD_METRICS[:2]]
        keys += [key for key in candidates if key not in keys]
    rows = []
    for group, metric, label in keys:
        row = [label]
        for card in cards.values():
            value = card.get("metrics", {}).get(group, {}).get(metric)
            if value is not None and card.get("kind") == "ood":
                value = 100.0 * value
            row.append(_show(value))
        rows.append(row)
    return rows


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    if len(text) == 64 and all(character in "0123456789abcdef" for character in text):
        return text[:16]  # a SHA-256: its first 16 hex digits tell cards apart
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS - 1] + "…"
