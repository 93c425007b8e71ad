#!/usr/bin/env bash
# OoD study (REPORT.md §3): split CIFAR-10 by class, build the shards, fine-tune the heads with and
# without CMA (and with its weight swept), and score MCM and energy on held-out ID vs OoD test images.
# Reads DATA_ROOT/cifar10_test/cifar10_test_jpg.tar (default DATA_ROOT: ../shared/data beside the repository).
#   bash scripts/studies/cifar_ood.sh [--data-root DATA_ROOT]
set -euo pipefail
source "$(dirname "$0")/data_root.sh"  # sets data_root (and repo)
out=runs/study/cifar
if [ ! -d runs/cifar10/test ]; then mkdir -p runs/cifar10 && tar -xf "$data_root/cifar10_test/cifar10_test_jpg.tar" -C runs/cifar10; fi
python scripts/studies/cifar_split.py --cifar runs/cifar10/test --out $out
for split in train val; do
  [ -f $out/$split/sizes.json ] || python scripts/make_shards.py --input $out/$split.jsonl --out $out/$split --maxcount 500 --quiet
done
python scripts/ablate.py --config configs/studies/cifar_ood.yaml --variants margin,cma --zero-shot --seeds 3 \
  --out $out/ablation --ood-id $out/id_test --ood cifar_ood=$out/ood_test --classes $out/id_classes.txt \
  --eval-batch-size 100
# the same at 3x the steps (120), scored on the first 100 test images per class (evaluation is the cost)
for folder in id_test ood_test; do
  mkdir -p $out/${folder}_100
  for path in $out/$folder/*_06[0-9][0-9].jpg; do ln -sf "$(readlink -f "$path")" "$out/${folder}_100/$(basename "$path")"; done
done
python scripts/ablate.py --config configs/studies/cifar_ood.yaml --variants margin,cma --seeds 3 \
  --out $out/ablation_120 --ood-id $out/id_test_100 --ood cifar_ood=$out/ood_test_100 --classes $out/id_classes.txt \
  --eval-batch-size 100 train.max_steps=120 train.warmup_steps=10 train.checkpoint_every=60
# the CMA weight swept over 0.001 (the default) .. 1 at 40 steps; margin, cma and zero-shot are the runs above
mkdir -p $out/cma_sweep
for variant in zero-shot margin cma; do ln -sfn ../ablation/$variant $out/cma_sweep/$variant; done
python scripts/ablate.py --config configs/studies/cifar_ood.yaml --variants margin,cma,cma@0.01,cma@0.1,cma@1 \
  --zero-shot --seeds 3 --out $out/cma_sweep --ood-id $out/id_test --ood cifar_ood=$out/ood_test \
  --classes $out/id_classes.txt --eval-batch-size 100
# the best λ of that sweep (0.1) checked at 120 steps; margin and cma are the 120-step runs above
mkdir -p $out/cma_120
for variant in margin cma; do ln -sfn ../ablation_120/$variant $out/cma_120/$variant; done
python scripts/ablate.py --config configs/studies/cifar_ood.yaml --variants margin,cma,cma@0.1 --seeds 3 \
  --out $out/cma_120 --ood-id $out/id_test_100 --ood cifar_ood=$out/ood_test_100 --classes $out/id_classes.txt \
  --eval-batch-size 100 train.max_steps=120 train.warmup_steps=10 train.checkpoint_every=60
python scripts/studies/cifar_accuracy.py --study $out --per-class 50
