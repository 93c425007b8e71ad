"""``mmsphere eval-retrieval`` end to end: a saved tiny run on real (tiny) mp4 shards and lists."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mmsphere
from mmsphere.data import build_eval_loader
from mmsphere.data.shards import ListEntry, write_shards
from mmsphere.eval import GEOMETRY_KEYS, TIE_RULE
from mmsphere.eval.cli import main
from mmsphere.eval.protocols import UNIFORM_SAMPLING
from mmsphere.models import load_run
from tests.run_dirs import incompatible_run, nan_run
from tests.eval.retrieval_reference import loop_dual_softmax, loop_metrics, loop_ranks


def independent_similarity(run_dir: Path, urls: str, frames: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Caption-by-video similarities from the model's own encoders over the data package's loader."""
    model = load_run(run_dir)
    video_features, captions, caption_to_video, keys = [], [], [], []
    with torch.no_grad():
        for batch in build_eval_loader(urls, "video", frames=frames, image_size=model.image_size,
                                       image_mean=model.image_mean, image_std=model.image_std, batch_size=4):
            video_features.append(model.encode_video(batch.media, batch.frame_mask))
            for key, sample_captions in zip(batch.keys, batch.captions):
                caption_to_video += [len(keys)] * len(sample_captions)
                captions += sample_captions
                keys.append(key)
        text_features = model.encode_text(model.tokenizer(captions))
    sim = text_features.double() @ torch.cat(video_features).double().T
    return sim.numpy(), caption_to_video, keys


def test_shards_end_to_end(run_dir, video_shards, tmp_path, capsys):
    out, sim_path = tmp_path / "results.json", tmp_path / "sim.npy"
    code = main(["--run", str(run_dir), "--data", video_shards, "--frames", "4", "--batch-size", "4",
                 "--out", str(out), "--save-sim", str(sim_path), "--dsl", "--dsl-temperature", "0.05"])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())

    sim, caption_to_video, keys = independent_similarity(run_dir, video_shards, frames=4)
    captions_of_video = [[c for c, v in enumerate(caption_to_video) if v == video] for video in range(len(keys))]
    saved = np.load(sim_path)
    np.testing.assert_allclose(saved, sim, atol=1e-5)
    saved_keys = json.loads((tmp_path / "sim.keys.json").read_text())
    assert saved_keys["gallery_keys"] == keys and saved_keys["caption_to_video"] == caption_to_video
    assert saved_keys["query_keys"][:2] == [f"{keys[0]}#0", f"{keys[0]}#1"]

    expected = {
        "t2v": loop_metrics(loop_ranks(sim, [[video] for video in caption_to_video])),
        "v2t": loop_metrics(loop_ranks(sim.T, captions_of_video)),
        "t2v_dsl": loop_metrics(loop_ranks(loop_dual_softmax(sim, 0.05), [[video] for video in caption_to_video])),
        "v2t_dsl": loop_metrics(loop_ranks(loop_dual_softmax(sim.T, 0.05), captions_of_video)),
    }
    assert set(results["metrics"]) == set(expected)
    for direction, metrics in expected.items():
        assert results["metrics"][direction] == pytest.approx(metrics), direction
    assert results["num_queries"] == {"t2v": 10, "v2t": 6} and results["num_gallery"] == {"t2v": 6, "v2t": 10}
    assert results["tie_rule"] == TIE_RULE
    assert results["dsl"]["temperature"] == 0.05
    assert set(results["geometry"]) == set(GEOMETRY_KEYS)
    assert results["model"]["run_dir"] == str(run_dir.resolve())
    media = results["data"].pop("media")
    assert results["data"] == {"modality": "video", "num_videos": 6, "num_captions": 10, "skipped": {},
                               "urls": video_shards, "frames": 4, "frame_sampling": UNIFORM_SAMPLING,
                               "n_listed": 6, "n_evaluated": 6, "subset": False}
    assert media["count"] == 2 and len(media["sha256"]) == 64  # the two shards are the media
    assert results["kind"] == "retrieval" and results["card_version"] == 1 and results["protocol"]["name"] == "shards"
    assert (tmp_path / "results.md").is_file()
    assert results["versions"]["torch"] == metadata.version("torch")
    assert results["versions"]["mmsphere"] == mmsphere.__version__
    for text in ("t2v (text->video)", "v2t (video->text)", "+ DSL (post-processed)", "tie rule:", "modality gap"):
        assert text in printed


def test_msrvtt_csv_gives_the_same_numbers_as_the_shards(run_dir, video_shards, msrvtt_csv, media, tmp_path):
    from_shards, from_list = tmp_path / "shards.json", tmp_path / "list.json"
    assert main(["--run", str(run_dir), "--data", video_shards, "--frames", "4", "--out", str(from_shards)]) == 0
    assert main(["--run", str(run_dir), "--list", str(msrvtt_csv), "--media-root", str(media), "--frames", "4",
                 "--out", str(from_list)]) == 0
    shards_results, list_results = json.loads(from_shards.read_text()), json.loads(from_list.read_text())
    assert "t2v_dsl" not in list_results["metrics"]
    for direction, metrics in shards_results["metrics"].items():
        assert list_results["metrics"][direction] == pytest.approx(metrics), direction
    assert list_results["geometry"] == pytest.approx(shards_results["geometry"], rel=1e-5)
    assert list_results["data"]["list"] == str(msrvtt_csv.resolve())
    assert list_results["data"]["num_captions"] == 10


def test_image_text_retrieval(run_dir, tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    for index in range(5):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)).save(path)
        entries.append(ListEntry(f"image{index}", path, [f"picture number {index}", f"image {index}"]))
    urls = write_shards(entries, tmp_path / "shards", progress=False).url_pattern()
    out = tmp_path / "results.json"
    # an open_clip architecture by name instead of a run directory (random weights: no download)
    assert main(["--model", "mmsphere-tiny", "--data", urls, "--modality", "image", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["num_queries"] == {"t2v": 10, "v2t": 5}
    assert results["data"]["frames"] == 1 and results["data"]["modality"] == "image"
    assert results["model"]["name"] == "mmsphere-tiny" and results["model"]["pretrained"] is None


@pytest.mark.parametrize(
    "arguments, message",
    [
        (lambda run, shards, tmp: ["--run", str(incompatible_run(run, tmp)), "--data", shards], "format_version=99"),
        (lambda run, shards, tmp: ["--run", str(tmp / "nowhere"), "--data", shards], "does not exist"),
        (lambda run, shards, tmp: ["--run", str(nan_run(run, tmp)), "--data", shards],
         "non-finite features for sample"),
        (lambda run, shards, tmp: ["--run", str(run), "--data", str(tmp / "val-{000000..000001}.tar")],
         "does not exist"),
        (lambda run, shards, tmp: ["--run", str(run), "--data", shards, "--media-root", str(tmp)],
         "--media-root goes with --list"),
        (lambda run, shards, tmp: ["--run", str(run), "--data", shards, "--save-sim", str(tmp / "sim.txt")],
         "--save-sim"),
        (lambda run, shards, tmp: ["--run", str(run), "--data", shards, "--frames", "0"], "--frames=0"),
        (lambda run, shards, tmp: ["--run", str(run), "--list", str(tmp / "missing.csv")], "does not exist"),
        (lambda run, shards, tmp: ["--run", str(run), "--pretrained", "openai", "--data", shards],
         "--pretrained goes with --model"),
    ],
)
def test_bad_input_fails_with_one_clear_message(arguments, message, run_dir, video_shards, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main([*arguments(run_dir, video_shards, tmp_path), "--out", str(out)]) == 2
    # the message is the last line; progress bars may precede it on stderr
    error = capsys.readouterr().err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert error.startswith("mmsphere eval-retrieval: error:") and message in error
    assert not out.exists()


def test_a_list_with_a_single_usable_video_is_refused(run_dir, media, tmp_path, capsys):
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"path": str(media / "video0.mp4"), "caption": "red"}) + "\n"
                       + json.dumps({"path": str(media / "missing.mp4"), "caption": "gone"}) + "\n")
    assert main(["--run", str(run_dir), "--list", str(listing), "--out", str(tmp_path / "r.json")]) == 2
    assert "1 of 2 samples" in capsys.readouterr().err
    assert main(["--run", str(run_dir), "--list", str(listing), "--out", str(tmp_path / "r.json"),
                 "--allow-missing"]) == 2
    assert "at least 2 videos" in capsys.readouterr().err


def test_library_entry_and_the_flat_metrics_training_logs(run_dir, video_shards):
    from mmsphere.eval import evaluate_retrieval, evaluate_retrieval_loader

    model = load_run(run_dir).train()
    results = evaluate_retrieval(model, video_shards, frames=4, progress=False)
    flat = evaluate_retrieval_loader(model, video_shards, frames=4)
    assert flat == {
        **{f"{direction}/{key}": value for direction in ("t2v", "v2t") for key, value in results["metrics"][direction].items()},
        **{f"geometry/{key}": value for key, value in results["geometry"].items()},
    }
    assert all(isinstance(value, float) for value in flat.values())
    assert model.training  # encoding ran in eval mode and gave the caller's mode back
