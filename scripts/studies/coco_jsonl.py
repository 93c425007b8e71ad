"""Turn a COCO caption annotation file into the JSONL sample list of ``scripts/make_shards.py``.

One row per image: ``{"key": "coco<image id>", "path": <image file>, "captions": [...]}``, images in
the order of the annotation file, captions in annotation order. With ``--per-caption``, one row per
caption instead: ``{"key": "coco<image id>_<n>", "path", "captions": [<caption n>], "group": "coco<image id>"}``
(every caption a training pair; the pairs of one image share a group for ``loss.positives: group``),
in a seeded random order so that every shard and shuffle buffer holds a mix of images.

    python scripts/studies/coco_jsonl.py --split val --out runs/coco_mini/val2017.jsonl [--data-root DATA_ROOT]

reads ``DATA_ROOT/coco_mini/annotations/captions_val2017.json`` and ``DATA_ROOT/coco_mini/val2017/``
(``DATA_ROOT`` defaults to the shared data folder beside the repository, ``<repo>/../shared/data``);
``--annotations`` and ``--images`` name other files instead.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="the shared data folder holding coco_mini/ (default: %(default)s)")
    parser.add_argument("--split", choices=("train", "val"), help="the coco_mini split under --data-root")
    parser.add_argument("--annotations", help="captions_*.json (default: from --data-root and --split)")
    parser.add_argument("--images", help="the folder holding the images (default: from --data-root and --split)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--per-caption", action="store_true", help="one row per caption, grouped by image")
    args = parser.parse_args()
    if args.split is None and (args.annotations is None or args.images is None):
        parser.error("give --split (with --data-root) or both --annotations and --images")
    coco = args.data_root / "coco_mini"
    args.annotations = args.annotations or coco / "annotations" / f"captions_{args.split}2017.json"
    args.images = args.images or coco / f"{args.split}2017"
    annotations = json.loads(Path(args.annotations).read_text())
    captions: dict[int, list[str]] = {}
    for annotation in annotations["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    images = Path(args.images).resolve()
    rows = [{"key": f"coco{image['id']}", "path": str(images / image["file_name"]), "captions": captions[image["id"]]}
            for image in annotations["images"] if image["id"] in captions]
    if args.per_caption:
        rows = [{"key": f"{row['key']}_{index}", "path": row["path"], "captions": [caption], "group": row["key"]}
                for row in rows for index, caption in enumerate(row["captions"])]
        random.Random(0).shuffle(rows)
    missing = [row["path"] for row in rows if not Path(row["path"]).is_file()]
    if missing:
        raise SystemExit(f"coco_jsonl: {len(missing)} image(s) missing, first {missing[0]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{args.out}: {len(rows)} rows, {len({row['path'] for row in rows})} images, "
          f"{sum(len(row['captions']) for row in rows)} captions")


if __name__ == "__main__":
    main()
