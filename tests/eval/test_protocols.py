"""Every shipped retrieval protocol end to end, from tiny annotation files in the benchmark's own format.

Each test writes the annotation file(s) exactly as the benchmark distributes them (CLIP4Clip's data
loaders are the reference for the layouts), real tiny mp4 clips named as the benchmark names them,
runs ``mmsphere eval-retrieval --protocol NAME`` and checks, against the model's own encoders and a
loop transcription of the metrics: which videos were kept (the split), which caption texts became
queries (one / all / paragraph), the frames, and the card.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsphere.data.samples import DecodeOptions, RawSample, decode_sample
from mmsphere.eval.cli import main
from mmsphere.eval.protocols import PROTOCOLS, RetrievalProtocol, get_protocol
from mmsphere.models import load_run
from tests.eval.conftest import CAPTIONS
from tests.eval.retrieval_reference import loop_metrics, loop_ranks

CLIPS = list(CAPTIONS)  # video0 ... video5 in the media fixture


def place(media: Path, clip: str, target: Path) -> Path:
    """A copy of fixture clip ``clip`` at ``target`` (the name the benchmark gives it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(media / f"{clip}.mp4", target)
    return target


def reference(run_dir: Path, videos: dict[str, Path], captions: dict[str, list[str]], frames: int):
    """Similarities of the expected caption texts and videos from the model's own encoders, and their metrics."""
    model = load_run(run_dir)
    options = DecodeOptions(frames=frames, image_size=model.image_size, image_mean=model.image_mean,
                            image_std=model.image_std, modality="video")
    keys = list(videos)
    texts = [text for key in keys for text in captions[key]]
    caption_to_video = [index for index, key in enumerate(keys) for _ in captions[key]]
    with torch.no_grad():
        clips = [decode_sample(RawSample(key, str(path), {"mp4": path.read_bytes(), "txt": b"x"}), options)
                 for key, path in videos.items()]
        video_features = model.encode_video(torch.stack([clip.frames for clip in clips]),
                                            torch.stack([clip.frame_mask for clip in clips]))
        text_features = model.encode_text(model.tokenizer(texts))
    sim = (text_features.double() @ video_features.double().T).numpy()
    of_video = [[c for c, v in enumerate(caption_to_video) if v == video] for video in range(len(keys))]
    metrics = {"t2v": loop_metrics(loop_ranks(sim, [[video] for video in caption_to_video])),
               "v2t": loop_metrics(loop_ranks(sim.T, of_video))}
    return sim, texts, keys, metrics


def run_protocol(name: str, run_dir: Path, media_root: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "results.json"
    code = main(["--run", str(run_dir), "--protocol", name, "--media-root", str(media_root), "--out", str(out),
                 "--save-sim", str(tmp_path / "sim.npy"), *extra])
    assert code == 0
    card = json.loads(out.read_text())
    card["_keys"] = json.loads((tmp_path / "sim.keys.json").read_text())
    card["_sim"] = np.load(tmp_path / "sim.npy")
    return card


def check(card: dict, run_dir: Path, videos: dict[str, Path], captions: dict[str, list[str]], frames: int,
          name: str) -> None:
    sim, texts, keys, metrics = reference(run_dir, videos, captions, frames)
    assert card["_keys"]["gallery_keys"] == keys
    assert card["_keys"]["captions"] == texts
    np.testing.assert_allclose(card["_sim"], sim, atol=1e-5)
    for direction in ("t2v", "v2t"):
        assert card["metrics"][direction] == pytest.approx(metrics[direction]), direction
    assert card["num_queries"] == {"t2v": len(texts), "v2t": len(keys)}
    protocol = get_protocol(name)
    assert card["protocol"]["name"] == name and card["protocol"]["version"] == protocol.version
    assert card["protocol"]["grouping"] == protocol.grouping
    data = card["data"]
    assert data["frames"] == frames and data["n_listed"] == len(keys) == data["n_evaluated"]
    assert data["subset"] is False and "missing" not in data
    assert data["media"]["count"] == len(keys)
    assert len(data["list_sha256"]) == 64


def test_msrvtt_1k_a_jsfusion_csv(run_dir, media, tmp_path):
    root = tmp_path / "msrvtt"
    videos = {f"video{7010 + index}": place(media, clip, root / "videos" / f"video{7010 + index}.mp4")
              for index, clip in enumerate(CLIPS[:4])}
    captions = {key: [CAPTIONS[clip][0]] for key, clip in zip(videos, CLIPS)}
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for index, (key, [caption]) in enumerate(captions.items()):
            writer.writerow([f"ret{index}", key.replace("video", "msr"), key, caption])
    card = run_protocol("msrvtt-1k-a", run_dir, root / "videos", tmp_path, "--annotations", str(root), "--frames", "3")
    check(card, run_dir, videos, captions, 3, "msrvtt-1k-a")
    assert card["data"]["annotations"]["captions"]["file"].endswith("MSRVTT_JSFUSION_test.csv")
    # the same CSV through --list (the custom-data path) gives the same numbers
    assert main(["--run", str(run_dir), "--list", str(root / "MSRVTT_JSFUSION_test.csv"), "--media-root",
                 str(root / "videos"), "--frames", "3", "--out", str(tmp_path / "list.json")]) == 0
    as_list = json.loads((tmp_path / "list.json").read_text())
    for direction in ("t2v", "v2t"):
        assert as_list["metrics"][direction] == pytest.approx(card["metrics"][direction])
    assert as_list["data"]["list_sha256"] == card["data"]["list_sha256"]
    assert as_list["data"]["media"] == card["data"]["media"]  # same files, same fingerprint


def test_msrvtt_1k_a_refuses_a_second_caption_for_a_video(run_dir, media, tmp_path, capsys):
    place(media, "video0", tmp_path / "video7010.mp4")
    place(media, "video1", tmp_path / "video7011.mp4")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7010,video7010,a\nret1,msr7011,video7011,b\nret2,msr7010,video7010,c\n")
    assert main(["--run", str(run_dir), "--protocol", "msrvtt-1k-a", "--media-root", str(tmp_path)]) == 2
    assert "one caption per video, but 'video7010' has 2" in capsys.readouterr().err


def test_msrvtt_full_json_keeps_the_test_split_and_every_caption(run_dir, media, tmp_path):
    root = tmp_path / "msrvtt"
    ids = {"video7009": "video0", "video7010": "video1", "video9999": "video2", "video8000": "video3"}
    files = {key: place(media, clip, root / "all_videos" / f"{key}.mp4") for key, clip in ids.items()}
    sentences = []
    for key, clip in ids.items():
        sentences += [{"video_id": key, "caption": f"{text} ({key})", "sen_id": len(sentences)}
                      for text in CAPTIONS[clip] + ["another caption"]]
    # the file lists videos out of order, and interleaves their captions
    sentences = sentences[::2] + sentences[1::2]
    (root / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": [], "sentences": sentences}))
    # test split = video7010..video9999, in numeric order; each video's captions in file order
    order = ["video7010", "video8000", "video9999"]
    captions = {key: [item["caption"] for item in sentences if item["video_id"] == key] for key in order}
    card = run_protocol("msrvtt-full", run_dir, root / "all_videos", tmp_path, "--annotations",
                        str(root / "MSRVTT_data.json"), "--frames", "2")
    check(card, run_dir, {key: files[key] for key in order}, captions, 2, "msrvtt-full")
    assert card["num_gallery"]["v2t"] == sum(len(texts) for texts in captions.values())


def write_msvd_split(root: Path) -> list[str]:
    ids = ["-4wsuPCjDBc_5_15", "mv89psg6zh4_33_46", "0lh_UWF9ZP4_62_69"]
    (root / "test_list.txt").write_text("\n".join(ids) + "\n")
    return ids


def test_msvd_test_list_and_all_video_descriptions(run_dir, media, tmp_path):
    root = tmp_path / "msvd"
    ids = write_msvd_split(root.mkdir() or root)
    files = {key: place(media, clip, root / "YouTubeClips" / f"{key}.avi") for key, clip in zip(ids, CLIPS)}
    place(media, "video4", root / "YouTubeClips" / "notinsplit_1_2.avi")
    lines = ["# MSVD descriptions", "# VIDEO_ID DESCRIPTION", ""]
    captions: dict[str, list[str]] = {}
    for key, clip in zip(ids, CLIPS):
        for text in CAPTIONS[clip]:
            lines.append(f"{key} {text}")
            captions.setdefault(key, []).append(text)
    lines.append("notinsplit_1_2 a video outside the test split")
    (root / "AllVideoDescriptions.txt").write_text("\n".join(lines) + "\n")
    card = run_protocol("msvd", run_dir, root / "YouTubeClips", tmp_path, "--annotations", str(root), "--frames", "2")
    check(card, run_dir, files, captions, 2, "msvd")
    assert set(card["data"]["annotations"]) == {"split", "captions"}


def test_msvd_captions_as_json_tokens(run_dir, media, tmp_path):
    root = tmp_path / "msvd"
    ids = write_msvd_split(root.mkdir() or root)
    files = {key: place(media, clip, root / f"{key}.mp4") for key, clip in zip(ids, CLIPS)}
    tokens = {key: [text.split() for text in CAPTIONS[clip]] for key, clip in zip(ids, CLIPS)}
    (root / "raw-captions.json").write_text(json.dumps(tokens))
    card = run_protocol("msvd", run_dir, root, tmp_path, "--frames", "2")  # annotations default to the media root
    check(card, run_dir, files, {key: [" ".join(words) for words in value] for key, value in tokens.items()}, 2,
          "msvd")


def test_msvd_never_unpickles_raw_captions(run_dir, media, tmp_path, capsys):
    write_msvd_split(tmp_path)
    # a pickle that would run code when loaded: it must not be opened at all
    (tmp_path / "raw-captions.pkl").write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")
    assert main(["--run", str(run_dir), "--protocol", "msvd", "--media-root", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "raw-captions.pkl is a pickle, which mmsphere never loads" in error and "AllVideoDescriptions.txt" in error
    assert not (tmp_path / "PWNED").exists()


def test_didemo_paragraphs_in_file_order(run_dir, media, tmp_path):
    root = tmp_path / "didemo"
    names = ["10015567@N08_3655084291_d8b58466fa.mp4", "12090392@N02_13482799053_87ef417396.mov",
             "89936183@N00_4466434302_d8d3c84374.avi"]
    files = {names[0]: place(media, "video0", root / "videos" / names[0]),           # the exact name
             names[1]: place(media, "video1", root / "videos" / f"{names[1]}.mp4"),  # the name + .mp4
             names[2]: place(media, "video2", root / "videos" / "89936183@N00_4466434302_d8d3c84374.mp4")}  # stem
    moments = [
        {"video": names[1], "times": [[0, 0], [1, 1]], "description": "the man walks in"},
        {"video": names[0], "times": [[2, 3]], "description": "a red car"},
        {"video": names[1], "times": [[4, 4]], "description": "he sits down"},
        {"video": "not_in_test_list.mp4", "times": [[0, 0]], "description": "excluded"},
        {"video": names[2], "times": [[0, 1]], "description": "a dog"},
        {"video": names[1], "times": [[5, 5]], "description": "the end"},
    ]
    (root / "test_data.json").write_text(json.dumps(moments))
    (root / "test_list.txt").write_text("\n".join(names) + "\n")
    # CLIP4Clip: one query per video, its descriptions joined by spaces in file order; videos in test_list order
    captions = {names[0]: ["a red car"], names[1]: ["the man walks in he sits down the end"], names[2]: ["a dog"]}
    card = run_protocol("didemo", run_dir, root / "videos", tmp_path, "--annotations", str(root))
    check(card, run_dir, files, captions, 64, "didemo")  # the protocol's own 64 frames
    assert card["num_queries"] == {"t2v": 3, "v2t": 3}


def test_activitynet_val_1_paragraphs_and_both_video_names(run_dir, media, tmp_path):
    root = tmp_path / "anet"
    files = {"v_QOlSCBRmfWY": place(media, "video0", root / "videos" / "QOlSCBRmfWY.mp4"),  # CLIP4Clip's naming
             "v_ehGHCYKzyZ8": place(media, "video1", root / "videos" / "v_ehGHCYKzyZ8.mkv"),
             "v_nwznKOuZM7w": place(media, "video2", root / "videos" / "sub" / "nwznKOuZM7w.webm")}
    data = {key: {"duration": 80.0, "timestamps": [[0.0, 10.0]] * 2,
                  "sentences": [f"{CAPTIONS[clip][0]}.", f" Then {key} ends."]}
            for key, clip in zip(files, CLIPS)}
    (root / "val_1.json").write_text(json.dumps(data))
    captions = {key: [f"{value['sentences'][0]} {value['sentences'][1].strip()}"] for key, value in data.items()}
    card = run_protocol("activitynet", run_dir, root / "videos", tmp_path, "--annotations",
                        str(root / "val_1.json"), "--frames", "4")
    check(card, run_dir, files, captions, 4, "activitynet")


def test_lsmdc_tab_separated_public_test(run_dir, media, tmp_path):
    root = tmp_path / "lsmdc"
    clips = ["1004_Juno_00.00.32.849-00.00.35.458", "1004_Juno_00.00.35.642-00.00.45.231",
             "0001_American_Beauty_00.00.51.926-00.00.54.129"]
    files = {clip: place(media, fixture, root / "avi" / clip.split("_00.")[0] / f"{clip}.avi")
             for clip, fixture in zip(clips, CLIPS)}
    sentences = ["SOMEONE sits in a chair.", 'She says, "hello".', "A car drives by; it's red."]
    lines = [f"{clip}\t00.00.32.849\t00.00.35.458\t00.00.32.849\t00.00.35.458\t{sentence}"
             for clip, sentence in zip(clips, sentences)]
    (root / "LSMDC16_challenge_1000_publictect.csv").write_text("\n".join(lines) + "\n")
    card = run_protocol("lsmdc", run_dir, root / "avi", tmp_path, "--annotations", str(root), "--frames", "2")
    check(card, run_dir, files, {clip: [sentence] for clip, sentence in zip(clips, sentences)}, 2, "lsmdc")


def test_a_malformed_lsmdc_line_is_named(run_dir, tmp_path, capsys):
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text("clip_a\t1\t2\tsentence without times\n")
    assert main(["--run", str(run_dir), "--protocol", "lsmdc", "--media-root", str(tmp_path)]) == 2
    assert "LSMDC16_challenge_1000_publictect.csv:1 has 4 fields, expected 6" in capsys.readouterr().err


def test_your_own_protocol_is_one_registered_definition(run_dir, media, tmp_path, monkeypatch):
    (tmp_path / "my_protocols.py").write_text(
        "from mmsphere.eval.annotations import DelimitedColumns, FileRole\n"
        "from mmsphere.eval.protocols import RetrievalProtocol, register_protocol\n"
        "register_protocol(RetrievalProtocol(name='my-bench', version='2', description='mine', source='me',\n"
        "    files=(FileRole('captions', ('test.tsv',)),),\n"
        "    reader=DelimitedColumns(video='clip', caption='text', delimiter='\\t'),\n"
        "    grouping='all', media_names=('{id}.mp4',), frames=3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_protocols", raising=False)
    files = {"a": place(media, "video0", tmp_path / "data" / "a.mp4"),
             "b": place(media, "video1", tmp_path / "data" / "b.mp4")}
    (tmp_path / "data" / "test.tsv").write_text("clip\ttext\na\tfirst\nb\tsecond\na\tthird\n")
    try:
        card = run_protocol("my-bench", run_dir, tmp_path / "data", tmp_path, "--imports", "my_protocols")
        check(card, run_dir, files, {"a": ["first", "third"], "b": ["second"]}, 3, "my-bench")
        assert card["protocol"]["version"] == "2"
    finally:
        PROTOCOLS.pop("my-bench", None)
        sys.modules.pop("my_protocols", None)


def test_protocol_definitions_are_checked():
    with pytest.raises(ValueError, match="grouping='some' must be one of one, all, paragraph"):
        RetrievalProtocol(name="x", version="1", description="", source="", files=PROTOCOLS["lsmdc"].files,
                          reader=PROTOCOLS["lsmdc"].reader, grouping="some")
    with pytest.raises(ValueError, match=r"may use only \{id\}, \{stem\} and \{bare\}"):
        RetrievalProtocol(name="x", version="1", description="", source="", files=PROTOCOLS["lsmdc"].files,
                          reader=PROTOCOLS["lsmdc"].reader, grouping="one", media_names=("{video}.mp4",))
    assert {"msrvtt-1k-a", "msrvtt-full", "msvd", "didemo", "activitynet", "lsmdc"} <= set(PROTOCOLS)


def test_the_library_does_what_the_command_does(run_dir, media, tmp_path):
    """protocol_set finds the files before any model exists; evaluate_set refuses a subset unless allowed."""
    from mmsphere.eval import IncompleteDataError, evaluate_set, protocol_set
    from mmsphere.results import make_card, model_precision, write_card

    place(media, "video0", tmp_path / "videos" / "video7010.mp4")
    place(media, "video1", tmp_path / "videos" / "video7011.mp4")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,m0,video7010,red\nret1,m1,video7011,green\nret2,m2,video7012,blue\n")
    evaluation_set = protocol_set("msrvtt-1k-a", tmp_path / "videos", annotations=tmp_path)
    assert (evaluation_set.listed, len(evaluation_set.entries)) == (3, 2)
    assert [(item.name, item.reason) for item in evaluation_set.missing] == [("video7012", "missing")]
    model = load_run(run_dir)
    with pytest.raises(IncompleteDataError, match="1 of 3 videos of protocol msrvtt-1k-a"):
        evaluate_set(model, evaluation_set, frames=2)
    results = evaluate_set(model, evaluation_set, frames=2, allow_missing=True, progress=False)
    assert results["data"]["subset"] and results["data"]["n_evaluated"] == 2
    card = make_card(results, kind="retrieval", model={"name": "x"}, precision=model_precision(model),
                     versions={}, command=[])
    json_path, markdown_path = write_card(tmp_path / "results.json", card)
    assert json.loads(json_path.read_text())["protocol"]["name"] == "msrvtt-1k-a"
    assert "Evaluated on a subset. 2 of 3 listed videos evaluated (1 missing)" in markdown_path.read_text()


def test_a_protocol_reports_only_its_directions_and_metrics(run_dir, media, tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    place(media, "video0", tmp_path / "video7010.mp4")
    place(media, "video1", tmp_path / "video7011.mp4")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,m0,video7010,red\nret1,m1,video7011,green\n")
    narrow = replace(PROTOCOLS["msrvtt-1k-a"], directions=("t2v",), metrics=("R@1", "MdR"))
    monkeypatch.setitem(PROTOCOLS, "msrvtt-1k-a", narrow)
    out = tmp_path / "r.json"
    assert main(["--run", str(run_dir), "--protocol", "msrvtt-1k-a", "--media-root", str(tmp_path), "--frames", "2",
                 "--dsl", "--out", str(out)]) == 0
    card = json.loads(out.read_text())
    assert {direction: set(values) for direction, values in card["metrics"].items()} == {
        "t2v": {"R@1", "MdR"}, "t2v_dsl": {"R@1", "MdR"}}
    assert "note: the annotation files list 2 videos; msrvtt-1k-a has 1,000" in capsys.readouterr().out
