#!/usr/bin/env bash
# Noisy-pairs study (REPORT.md §1): the demo data at a given fraction of mismatched captions, the
# angular-margin objective with meta weighting off ("margin") and on ("meta"), 3 seeds each.
#   bash scripts/studies/noisy_pairs.sh 20     # 20% mismatched; runs/study/noisy_20/{data,ablation}
set -euo pipefail
level=${1:?mismatch level in percent: 00, 20 or 40}
out=runs/study/noisy_${level}
[ -f "$out/data/meta.json" ] || python scripts/demo.py --data-only --out "$out" --mismatch "0.${level}" --seed 0
data=$out/data
python scripts/ablate.py --config configs/demo.yaml --variants margin,meta --seeds 3 --out "$out/ablation" \
  --mismatched-keys "$data/meta.json" "${@:2}" \
  "data.train=[{urls: '$data/train/video/shard-{000000..000011}.tar', modality: video, weight: 2.0, name: clips}, {urls: '$data/train/image/shard-{000000..000005}.tar', modality: image, weight: 1.0, name: images}]" \
  "data.meta={urls: '$data/meta/shard-{000000..000003}.tar', modality: video, name: meta}" \
  "data.val={urls: '$data/val/shard-{000000..000003}.tar', modality: video, name: val}"
