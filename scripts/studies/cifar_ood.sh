#!/usr/bin/env bash
# OoD study (REPORT.md §3): split CIFAR-10 by class, build the shards, fine-tune the heads with and
# without CMA and score MCM and energy on held-out ID vs OoD test images.
#   bash scripts/studies/cifar_ood.sh
set -euo pipefail
out=runs/study/cifar
if [ ! -d runs/cifar10/test ]; then mkdir -p runs/cifar10 && tar -xf ../shared/data/cifar10_test/cifar10_test_jpg.tar -C runs/cifar10; fi
python scripts/studies/cifar_split.py --cifar runs/cifar10/test --out $out
for split in train val; do
  [ -f $out/$split/sizes.json ] || python scripts/make_shards.py --input $out/$split.jsonl --out $out/$split --maxcount 500 --quiet
done
python scripts/ablate.py --config configs/studies/cifar_ood.yaml --variants margin,cma --zero-shot --seeds 3 \
  --out $out/ablation --ood-id $out/id_test --ood cifar_ood=$out/ood_test --classes $out/id_classes.txt \
  --eval-batch-size 100
