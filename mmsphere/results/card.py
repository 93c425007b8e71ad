"""Results cards: what every evaluation writes, ``results.json`` and ``results.md``, and how cards are read back.

A card is the evaluation's JSON with everything needed to trust, reproduce and compare its numbers
(ARCHITECTURE.md, Evaluation conventions): the protocol and its version, the list files' digest and a
fingerprint of the media used, n listed / n evaluated (a subset says so in bold), the model (run
directory with its config and weights digests, or open_clip name + pretrained tag), frames and their
sampling, precision, package versions, the date, the command and the metrics. ``results.md`` renders the same card for people.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmsphere.atomic import write_text_atomic
from mmsphere.digest import file_sha256
from mmsphere.errors import DataError

CARD_VERSION = 1
KINDS = ("retrieval", "ood")
DIRECTION_LABELS = {"t2v": "t2v (text→video)", "v2t": "v2t (video→text)",
                    "t2v_dsl": "t2v + DSL (post-processed)", "v2t_dsl": "v2t + DSL (post-processed)"}
RETRIEVAL_METRICS = ("R@1", "R@5", "R@10", "MdR", "MnR")
OOD_METRICS = (("FPR95", "FPR@95 %"), ("AUROC", "AUROC %"), ("AUPR_IN", "AUPR-In %"), ("AUPR_OUT", "AUPR-Out %"))


def make_card(results: dict[str, Any], *, kind: str, model: dict[str, Any], precision: dict[str, str],
              versions: dict[str, str], command: list[str]) -> dict[str, Any]:
    """The card of one evaluation: ``results`` (an evaluation's dict) with the identity every card carries."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} must be one of {KINDS}")
    card = {"card_version": CARD_VERSION, "kind": kind, "protocol": results.get("protocol"), "model": model}
    card.update({key: value for key, value in results.items() if key not in card})
    card.update(precision=precision, versions=versions,
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command)
    return card


def model_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """A loaded model's identity with, for a run directory, the SHA-256 of its resolved ``config.yaml``."""
    identity = dict(identity)
    if "run_dir" in identity:
        config = Path(identity["run_dir"]) / "config.yaml"
        identity["config_sha256"] = file_sha256(config) if config.is_file() else None
    return identity


def model_precision(model: Any) -> dict[str, str]:
    """The dtype the encoders ran in and the one scores are computed in (always float32, as ARCHITECTURE.md says)."""
    parameter = next(model.parameters(), None)
    encoders = str(parameter.dtype).removeprefix("torch.") if parameter is not None else "unknown"
    return {"encoders": encoders, "scores": "float32"}


def write_card(path: str | os.PathLike, card: dict[str, Any]) -> tuple[Path, Path]:
    """Write the card as JSON at ``path`` and as markdown beside it (``results.json`` -> ``results.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    markdown = path.with_suffix(".md")
    if markdown == path:
        raise ValueError(f"the card's JSON path {str(path)!r} must not end in .md (the markdown goes beside it)")
    return write_text_atomic(path, json.dumps(card, indent=2) + "\n"), write_text_atomic(markdown, card_markdown(card))


def load_card(path: str | os.PathLike) -> dict[str, Any]:
    """A card written by :func:`write_card`; anything else is a one-line DataError."""
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"results card {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"results card {str(path)!r} is not readable JSON ({error})") from None
    if not isinstance(card, dict) or card.get("kind") not in KINDS or "card_version" not in card:
        raise DataError(f"{str(path)!r} is not a results card (no card_version/kind; written by an older mmsphere?)")
    if card["card_version"] > CARD_VERSION:
        raise DataError(f"results card {str(path)!r} has card_version={card['card_version']}; this mmsphere reads "
                        f"up to {CARD_VERSION}")
    return card


# --------------------------------------------------------------------------------------------
# markdown


def card_markdown(card: dict[str, Any]) -> str:
    """The card for people: identity table, the subset warning when there is one, the metrics tables."""
    if card["kind"] == "retrieval":
        title, identity, metrics = "text–video retrieval", _retrieval_identity(card), _retrieval_metrics(card)
    else:
        title, identity, metrics = "OoD detection", _ood_identity(card), _ood_metrics(card)
    protocol = card.get("protocol") or {}
    name = protocol.get("name", "custom")
    version = f" (version {protocol['version']})" if protocol.get("version") else ""
    lines = [f"# Results card: {title}, {name}{version}", ""]
    subset = subset_line(card)
    if subset:
        lines += [f"**{subset}**", ""]
    lines += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in identity), "", *metrics, ""]
    return "\n".join(lines)


def subset_line(card: dict[str, Any]) -> str:
    """One sentence when the card's numbers come from a subset of what was listed, else ``""``."""
    parts = []
    if card["kind"] == "retrieval":
        parts.append(_subset_of(card.get("data", {}), "videos"))
    else:
        for name, values in [("ID set", card.get("id", {})), *((f"OoD set {n}", v) for n, v in
                                                                card.get("ood", {}).items())]:
            part = _subset_of(values, "images")
            parts.append(f"{name}: {part}" if part else "")
        dropped = card.get("sets_missing") or []
        if dropped:
            parts.append(f"OoD sets not found and left out: {', '.join(dropped)}")
    parts = [part for part in parts if part]
    return ("Evaluated on a subset. " + "; ".join(parts) + ".") if parts else ""


def _subset_of(record: dict[str, Any], unit: str) -> str:
    if not record.get("subset"):
        return ""
    missing = record.get("missing") or {}
    reasons = ", ".join(f"{count} {reason}" for reason, count in (missing.get("by_reason") or {}).items())
    where = f"; names in {missing['file']}" if missing.get("file") else ""
    return (f"{record.get('n_evaluated')} of {record.get('n_listed')} listed {unit} evaluated"
            f"{f' ({reasons})' if reasons else ''}{where}")


def _short(digest: str | None) -> str:
    return f"`{digest[:16]}`" if digest else "—"


def _model_line(model: dict[str, Any]) -> str:
    if "run_dir" in model:
        # a frozen-tower run's weights file holds its trained tensors only: its base's digest completes it
        base = f", frozen base sha256 {_short(model['frozen_base_sha256'])}" if model.get("frozen_base_sha256") else ""
        return (f"run `{model['run_dir']}` (config sha256 {_short(model.get('config_sha256'))}, "
                f"weights sha256 {_short(model.get('weights_sha256'))}{base})")
    pretrained = f"pretrained `{model['pretrained']}`" if model.get("pretrained") else "no pretrained weights"
    return f"open_clip `{model.get('name')}`, {pretrained}"


def _media_line(media: dict[str, Any] | None, root: str | None) -> str:
    if not media:
        return "—"
    where = f" under `{root}`" if root else ""
    return (f"{media['count']} files, {media['total_bytes']:,} bytes{where}; fingerprint {_short(media['sha256'])} "
            "(names and sizes)")


def _common_identity(card: dict[str, Any]) -> list[tuple[str, str]]:
    versions = card.get("versions", {})
    shown = ", ".join(f"{name} {versions[name]}" for name in
                      ("mmsphere", "torch", "open-clip-torch", "numpy", "decord", "av", "python") if name in versions)
    precision = card.get("precision") or {}
    return [
        ("model", _model_line(card.get("model", {}))),
        ("precision", f"encoders {precision.get('encoders', '?')}, scores {precision.get('scores', '?')}"),
        ("versions", shown),
        ("date", card.get("date", "—")),
        ("command", f"`mmsphere {' '.join(card.get('command', []))}`"),
    ]


def _retrieval_identity(card: dict[str, Any]) -> list[tuple[str, str]]:
    protocol, data = card.get("protocol") or {}, card.get("data", {})
    if "annotations" in data:
        listing = "; ".join(f"{Path(value['file']).name} sha256 {_short(value['sha256'])}"
                            for value in data["annotations"].values())
    elif "list" in data:
        listing = f"{Path(data['list']).name} sha256 {_short(data.get('list_sha256'))}"
    else:
        listing = f"shards `{data.get('urls')}`"
    rows = [("protocol", f"{protocol.get('name', 'custom')} — {protocol.get('description', '')} "
                         f"(captions per video: {protocol.get('grouping', '?')})")]
    if protocol.get("source"):
        rows.append(("source", protocol["source"]))
    rows += [
        ("list", listing),
        ("media", _media_line(data.get("media"), data.get("media_root"))),
        ("evaluated", f"{data.get('n_evaluated', data.get('num_videos'))} of {data.get('n_listed', '?')} listed "
                      f"{data.get('modality', 'video')}s, {data.get('num_captions')} captions"),
        ("frames", f"{data.get('frames')}; {data.get('frame_sampling', '?')}"),
        *_common_identity(card),
    ]
    return rows


def _retrieval_metrics(card: dict[str, Any]) -> list[str]:
    header = ["direction", *RETRIEVAL_METRICS, "queries", "gallery"]
    lines = ["## Metrics", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for direction, metrics in card.get("metrics", {}).items():
        base = direction.removesuffix("_dsl")
        cells = [DIRECTION_LABELS.get(direction, direction), *(_number(metrics.get(key)) for key in RETRIEVAL_METRICS),
                 str(card.get("num_queries", {}).get(base, "")), str(card.get("num_gallery", {}).get(base, ""))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"R@K in %, MdR/MnR as ranks from 1. Tie rule: {card.get('tie_rule', '—')}"]
    if "dsl" in card:
        lines.append(f"DSL rows are post-processed: {card['dsl']['definition']} (T={card['dsl']['temperature']:.4g}).")
    return lines


def _ood_identity(card: dict[str, Any]) -> list[tuple[str, str]]:
    protocol = card.get("protocol") or {}
    description = protocol.get("description", "ID and OoD sets given")
    rows = [("protocol", f"{protocol.get('name', 'custom')} — {description}")]
    if protocol.get("source"):
        rows.append(("source", protocol["source"]))
    identity = card.get("id", {})
    rows.append(("ID set", _set_line(identity)))
    for name, values in card.get("ood", {}).items():
        rows.append((f"OoD {values.get('role', 'ood')}: {name}", _set_line(values)))
    classes = card.get("classes", {})
    rows += [
        ("score", f"{card.get('score')} (T={card.get('temperature', float('nan')):.4g}), "
                  f"{len(classes.get('names', []))} classes, {len(card.get('templates', []))} templates"),
        ("convention", card.get("convention", "—")),
        *_common_identity(card),
    ]
    return rows


def _set_line(values: dict[str, Any]) -> str:
    media = values.get("media") or {}
    return (f"`{values.get('spec')}`: {values.get('n_evaluated', values.get('num_samples'))} of "
            f"{values.get('n_listed', '?')} images, fingerprint {_short(media.get('sha256'))}")


def _ood_metrics(card: dict[str, Any]) -> list[str]:
    header = ["set", "role", *(label for _, label in OOD_METRICS), "images"]
    lines = ["## Metrics", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ood = card.get("ood", {})
    for name, metrics in card.get("metrics", {}).items():
        if name == "mean":
            continue
        lines.append(_ood_row(name, ood.get(name, {}).get("role", "ood"), metrics, ood.get(name, {}).get("n_evaluated",
                                                                                                        "")))
    for group, metrics in (card.get("group_means") or {}).items():
        lines.append(_ood_row(f"mean {group}", group, metrics, ""))
    if "mean" in card.get("metrics", {}):
        lines.append(_ood_row("**mean**", "all", card["metrics"]["mean"], ""))
    lines += ["", f"Convention: {card.get('convention', '—')}"]
    return lines


def _ood_row(name: str, role: str, metrics: dict[str, float], count: Any) -> str:
    cells = [name, role, *(_number(100.0 * metrics[key]) for key, _ in OOD_METRICS), str(count)]
    return "| " + " | ".join(cells) + " |"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return "—" if value is None else str(value)
