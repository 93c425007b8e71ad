"""Order accuracy of trained demo runs on the validation split's reversed-motion pairs (REPORT.md §4).

The demo's validation clips come in pairs (keys 2k, 2k+1): the same digit image moving in the same
two directions, in opposite order, with captions that differ only in that order. For each clip, the
video→text order accuracy is whether its own caption scores above its partner's caption, and the
text→video one whether its caption picks it over the partner clip; chance is 50%. Retrieval R@1 mixes
digit, direction and order; this isolates order. Writes ``order_accuracy.json`` into every run folder.

    python scripts/studies/temporal_order.py runs/study/noisy_00/ablation/margin/seed_* runs/study/temporal_mean/margin/seed_*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmsphere.data import build_eval_loader
from mmsphere.eval.encode import encode_eval_set
from mmsphere.models import load_run
from mmsphere.train.config import load_config


def order_accuracy(run_dir: Path) -> dict[str, float]:
    """``{"v2t": ..., "t2v": ..., "pairs": N}`` of one run on its config's ``data.val`` (a demo val split)."""
    model = load_run(run_dir).eval()
    config = load_config(run_dir / "config.yaml")
    batches = build_eval_loader(config.data.val.urls, "video", frames=config.data.frames, image_size=model.image_size,
                                image_mean=model.image_mean, image_std=model.image_std, batch_size=50)
    encoded = encode_eval_set(model, batches, progress=False)
    index = {key: position for position, key in enumerate(encoded.keys)}
    first = sorted(key for key in encoded.keys if int(key.rsplit("-", 1)[1]) % 2 == 0)
    pairs = [(index[key], index[f"{key.rsplit('-', 1)[0]}-{int(key.rsplit('-', 1)[1]) + 1:06d}"]) for key in first]
    caption = [captions[0] for captions in encoded.captions_of_video]  # one caption per demo clip
    similarity = encoded.image_features @ encoded.text_features.T  # [videos, captions]
    video_to_text, text_to_video = [], []
    for a, b in pairs:
        ca, cb = caption[a], caption[b]
        video_to_text += [bool(similarity[a, ca] > similarity[a, cb]), bool(similarity[b, cb] > similarity[b, ca])]
        text_to_video += [bool(similarity[a, ca] > similarity[b, ca]), bool(similarity[b, cb] > similarity[a, cb])]
    # how far apart the encoders put the two orders: 1.0 = they cannot tell them apart at all
    text_cosine = torch.stack([encoded.text_features[caption[a]] @ encoded.text_features[caption[b]] for a, b in pairs])
    video_cosine = torch.stack([encoded.image_features[a] @ encoded.image_features[b] for a, b in pairs])
    return {"v2t": 100 * sum(video_to_text) / len(video_to_text), "t2v": 100 * sum(text_to_video) / len(text_to_video),
            "pairs": len(pairs), "partner_text_cosine": float(text_cosine.mean()),
            "partner_video_cosine": float(video_cosine.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="trained run folders")
    args = parser.parse_args()
    torch.manual_seed(0)
    for run in map(Path, args.runs):
        result = order_accuracy(run)
        (run / "order_accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"{run}: order accuracy v2t {result['v2t']:.1f}%, t2v {result['t2v']:.1f}% over {result['pairs']} pairs; "
              f"partner cosine text {result['partner_text_cosine']:.4f}, video {result['partner_video_cosine']:.4f}")


if __name__ == "__main__":
    main()
