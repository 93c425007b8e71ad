#!/usr/bin/env bash
# Real image-text study (REPORT.md §2): every variant of the ablation tool on the COCO caption subset
# with the offline towers (heads trained, towers frozen), plus the untrained model.
# Needs the offline towers: pip install -e '.[offline-towers]' && mmsphere export-offline-towers --out runs/offline_towers
#   bash scripts/studies/coco.sh
set -euo pipefail
coco=../shared/data/coco_mini
for split in train val; do
  if [ ! -f runs/coco_mini/$split/sizes.json ]; then
    python scripts/studies/coco_jsonl.py --annotations $coco/annotations/captions_${split}2017.json \
      --images $coco/${split}2017 --out runs/coco_mini/${split}2017.jsonl
    python scripts/make_shards.py --input runs/coco_mini/${split}2017.jsonl --out runs/coco_mini/$split --maxcount 40 --quiet
  fi
done
python scripts/ablate.py --config configs/studies/coco_heads.yaml --variants clip,margin,meta,m2mix,calunif,cma,all \
  --zero-shot --seeds 3 --out runs/study/coco --eval-batch-size 100
