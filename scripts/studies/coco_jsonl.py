"""Turn a COCO caption annotation file into the JSONL sample list of ``scripts/make_shards.py``.

One row per image: ``{"key": "coco<image id>", "path": <image file>, "captions": [...]}``, images in
the order of the annotation file, captions in annotation order.

    python scripts/studies/coco_jsonl.py --annotations ../shared/data/coco_mini/annotations/captions_val2017.json \
        --images ../shared/data/coco_mini/val2017 --out runs/coco_mini/val2017.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, help="captions_*.json")
    parser.add_argument("--images", required=True, help="the folder holding the images")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    args = parser.parse_args()
    annotations = json.loads(Path(args.annotations).read_text())
    captions: dict[int, list[str]] = {}
    for annotation in annotations["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    images = Path(args.images).resolve()
    rows = [{"key": f"coco{image['id']}", "path": str(images / image["file_name"]), "captions": captions[image["id"]]}
            for image in annotations["images"] if image["id"] in captions]
    missing = [row["path"] for row in rows if not Path(row["path"]).is_file()]
    if missing:
        raise SystemExit(f"coco_jsonl: {len(missing)} image(s) missing, first {missing[0]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{args.out}: {len(rows)} images, {sum(len(row['captions']) for row in rows)} captions")


if __name__ == "__main__":
    main()
