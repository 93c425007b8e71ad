#!/usr/bin/env bash
# Real image-text study (REPORT.md §2): every variant of the ablation tool on the COCO caption subset
# with the offline towers (heads trained, towers frozen), plus the untrained model.
# Needs the offline towers: pip install -e '.[offline-towers]' && mmsphere export-offline-towers --out runs/offline_towers
# Reads DATA_ROOT/coco_mini (default DATA_ROOT: ../shared/data beside the repository).
#   bash scripts/studies/coco.sh [--data-root DATA_ROOT]
set -euo pipefail
source "$(dirname "$0")/data_root.sh"  # sets data_root (and repo)
for split in train val; do
  if [ ! -f runs/coco_mini/$split/sizes.json ]; then
    python scripts/studies/coco_jsonl.py --data-root "$data_root" --split $split --out runs/coco_mini/${split}2017.jsonl
    python scripts/make_shards.py --input runs/coco_mini/${split}2017.jsonl --out runs/coco_mini/$split --maxcount 40 --quiet
  fi
done
python scripts/ablate.py --config configs/studies/coco_heads.yaml --variants clip,margin,meta,m2mix,calunif,cma,all \
  --zero-shot --seeds 3 --out runs/study/coco --eval-batch-size 100
