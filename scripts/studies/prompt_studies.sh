#!/usr/bin/env bash
# The cached-feature studies of REPORT.md §5-§8: CIFAR-10 class prompts (noisy captions; duplicates
# as negatives vs multi-positive with and without CMA; the loss family; CMA's weight) and the loss
# family on COCO, each variant with the same 5 seeds, heads trained on frozen offline towers whose
# outputs are encoded once into a feature cache (data.feature_cache: true in every config below).
# Needs: pip install -e '.[offline-towers]' && mmsphere export-offline-towers --out runs/offline_towers
# Reads DATA_ROOT/cifar10_test and DATA_ROOT/coco_mini (default DATA_ROOT: ../shared/data beside the repository).
#   bash scripts/studies/prompt_studies.sh [--data-root DATA_ROOT]
# Runs that finished are reused (ablate.py skips them), so an interrupted study continues where it stopped.
set -euo pipefail
source "$(dirname "$0")/data_root.sh"  # sets data_root (and repo)
out=runs/study2
seeds=5
# --- data: CIFAR-10 prompt sets and COCO captions as shards ----------------------------------------------
source "$(dirname "$0")/prompt_data.sh"
all10="$out/cifar/all10"
id5="$out/cifar/id5"
ood=(--ood-id "$id5/id_test/shard-{000000..000001}.tar" --ood "cifar_ood=$id5/ood_test/shard-{000000..000001}.tar"
     --classes $id5/id_classes.txt --ood-scores mcm,energy,neglabel --neg-labels scripts/studies/negative_labels.txt
     --eval-batch-size 500)
family=clip,angular_margin:margin=0.05,angular_margin:margin=0.1,angular_margin:margin=0.2,siglip,siglip:margin=0.1
# --- convergence: the baseline trained for 50 ... 800 steps on both CIFAR tasks (class accuracy vs steps) ---
for steps in 50 100 200 400 800; do
  python scripts/ablate.py --config configs/studies/cifar10_noisy.yaml --variants margin --seeds $seeds \
    --out $out/convergence/all10_$steps --ood-id "$all10/test/shard-{000000..000003}.tar" --classes $all10/classes.txt \
    --eval-batch-size 500 train.max_steps=$steps train.warmup_steps=$((steps / 20)) train.val_every=0 train.checkpoint_every=$steps
  python scripts/ablate.py --config configs/studies/cifar_prompts.yaml --variants margin --seeds $seeds \
    --out $out/convergence/id5_$steps "${ood[@]}" train.max_steps=$steps train.warmup_steps=$((steps / 20)) \
    train.val_every=0 train.checkpoint_every=$steps
done
# --- §5 noisy captions: meta weighting off (margin) vs on (meta), at 0/20/40% corrupted captions ----------
for level in 00 20 40; do
  python scripts/ablate.py --config configs/studies/cifar10_noisy.yaml --variants margin,meta --seeds $seeds \
    --out $out/noisy_$level --ood-id "$all10/test/shard-{000000..000003}.tar" --classes $all10/classes.txt \
    --mismatched-keys $all10/mismatched_$level.txt --eval-batch-size 500 \
    "data.train=[{name: cifar10_train, urls: '$all10/train_$level/shard-{000000..000009}.tar', modality: image}]"
done
# the baseline stopped early, near its best validation step (a stronger baseline than 400 steps under noise)
for level in 20 40; do
  for steps in 100 200; do
    python scripts/ablate.py --config configs/studies/cifar10_noisy.yaml --variants margin --seeds $seeds \
      --out $out/noisy_${level}_early/steps_$steps --ood-id "$all10/test/shard-{000000..000003}.tar" --classes $all10/classes.txt \
      --eval-batch-size 500 train.max_steps=$steps train.warmup_steps=$((steps / 20)) train.checkpoint_every=$steps \
      "data.train=[{name: cifar10_train, urls: '$all10/train_$level/shard-{000000..000009}.tar', modality: image}]"
  done
done
# --- §6 duplicates as negatives vs multi-positive, with and without CMA, at batch 64 and 256 --------------
# the same number of epochs at both batch sizes: 400 steps of 64 and 100 steps of 256 (10 epochs of 2500 pairs)
for batch in 64 256; do
  steps=$((400 * 64 / batch))
  for positives in diagonal group; do
    python scripts/ablate.py --config configs/studies/cifar_prompts.yaml --variants margin,cma --seeds $seeds \
      --out $out/duplicates/b${batch}_$positives "${ood[@]}" train.batch_size=$batch loss.positives=$positives \
      train.max_steps=$steps train.warmup_steps=$((steps / 20)) train.checkpoint_every=$steps train.val_every=$((steps / 16))
  done
done
# --- §7 loss family, diagonal vs group positives, on the CIFAR-10 prompt task and on COCO -----------------
for positives in diagonal group; do
  python scripts/ablate.py --config configs/studies/cifar_prompts.yaml --variants $family --seeds $seeds \
    --out $out/family_cifar/$positives "${ood[@]}" loss.positives=$positives
  python scripts/ablate.py --config configs/studies/coco_captions.yaml --variants $family --seeds $seeds \
    --out $out/family_coco/$positives --eval-batch-size 500 loss.positives=$positives
done
# --- §8 CMA's weight at convergence (λ = 0 is the margin variant, 0.001 the cma variant of §6) ------------
python scripts/ablate.py --config configs/studies/cifar_prompts.yaml --variants margin,cma,cma@0.01,cma@0.1 \
  --seeds $seeds --out $out/cma_weight "${ood[@]}"
python scripts/studies/cached_figures.py --runs $out
