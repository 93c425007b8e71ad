#!/usr/bin/env bash
# Temporal-head study (REPORT.md §4): the "margin" variant (angular margin, no meta weighting) on the
# clean demo data (runs/study/noisy_00/data) with the parameter-free mean head; the transformer-head
# arm is the same variant in the noisy-pairs study at 0% (configs/demo.yaml's head), same seeds.
#   bash scripts/studies/temporal.sh
set -euo pipefail
data=runs/study/noisy_00/data
[ -f "$data/meta.json" ] || python scripts/demo.py --data-only --out runs/study/noisy_00 --mismatch 0 --seed 0
python scripts/ablate.py --config configs/demo.yaml --variants margin --seeds 3 --out runs/study/temporal_mean \
  model.temporal_head=mean \
  "data.train=[{urls: '$data/train/video/shard-{000000..000011}.tar', modality: video, weight: 2.0, name: clips}, {urls: '$data/train/image/shard-{000000..000005}.tar', modality: image, weight: 1.0, name: images}]" \
  "data.meta={urls: '$data/meta/shard-{000000..000003}.tar', modality: video, name: meta}" \
  "data.val={urls: '$data/val/shard-{000000..000003}.tar', modality: video, name: val}"
