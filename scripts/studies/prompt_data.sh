#!/usr/bin/env bash
# The data of the cached-feature studies (sourced by prompt_studies.sh and margin_family.sh; needs $out,
# $data_root): CIFAR-10 prompt sets (scripts/studies/prompt_sets.py) and COCO per-caption pairs as shards.
# Sets already written are kept.
if [ ! -d runs/cifar10/test ]; then mkdir -p runs/cifar10 && tar -xf "$data_root/cifar10_test/cifar10_test_jpg.tar" -C runs/cifar10; fi
[ -f $out/cifar/id5/train.jsonl ] || python scripts/studies/prompt_sets.py --cifar runs/cifar10/test --out $out/cifar
for set in all10/train_00 all10/train_20 all10/train_40 all10/meta all10/val all10/test id5/train id5/val id5/id_test id5/ood_test; do
  [ -f $out/cifar/$set/sizes.json ] || python scripts/make_shards.py --input $out/cifar/$set.jsonl --out $out/cifar/$set --maxcount 500 --quiet
done
if [ ! -f $out/coco/val/sizes.json ]; then
  python scripts/studies/coco_jsonl.py --data-root "$data_root" --split train --per-caption --out $out/coco/train_captions.jsonl
  python scripts/studies/coco_jsonl.py --data-root "$data_root" --split val --out $out/coco/val.jsonl
  python scripts/make_shards.py --input $out/coco/train_captions.jsonl --out $out/coco/train --maxcount 400 --quiet
  python scripts/make_shards.py --input $out/coco/val.jsonl --out $out/coco/val --maxcount 100 --quiet
fi
