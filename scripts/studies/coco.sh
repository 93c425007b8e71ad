#!/usr/bin/env bash
# Real image-text study (REPORT.md §2): every variant of the ablation tool on the COCO caption subset
# with the offline towers (heads trained, towers frozen), plus the untrained model.
# Needs the offline towers: pip install -e '.[offline-towers]' && mmsphere export-offline-towers --out runs/offline_towers
# Reads DATA_ROOT/coco_mini (default DATA_ROOT: ../shared/data beside the repository).
#   bash scripts/studies/coco.sh [--data-root DATA_ROOT]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
data_root=$repo/../shared/data  # the shared data folder next to the repository
while [ $# -gt 0 ]; do
  case $1 in
    --data-root) data_root=${2:?--data-root needs a folder}; shift 2 ;;
    --data-root=*) data_root=${1#--data-root=}; shift ;;
    *) echo "$(basename "$0"): unknown argument $1 (only --data-root DIR)" >&2; exit 2 ;;
  esac
done
[ -d "$data_root" ] || { echo "$(basename "$0"): data root $data_root is not a folder (pass --data-root DIR)" >&2; exit 2; }
for split in train val; do
  if [ ! -f runs/coco_mini/$split/sizes.json ]; then
    python scripts/studies/coco_jsonl.py --data-root "$data_root" --split $split --out runs/coco_mini/${split}2017.jsonl
    python scripts/make_shards.py --input runs/coco_mini/${split}2017.jsonl --out runs/coco_mini/$split --maxcount 40 --quiet
  fi
done
python scripts/ablate.py --config configs/studies/coco_heads.yaml --variants clip,margin,meta,m2mix,calunif,cma,all \
  --zero-shot --seeds 3 --out runs/study/coco --eval-batch-size 100
