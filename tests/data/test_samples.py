"""Captions, member names and media selection of one raw sample."""

import json

import pytest
from webdataset.tariterators import base_plus_ext

from mmsphere.data.decode import DecodeError
from mmsphere.data.samples import media_modality, read_captions, split_member_name


@pytest.mark.parametrize(
    "name",
    ["abc.mp4", "dir/abc.txt", "a/b/c.seg.json", "key.JPG", "noextension", "dir.v1/key.png", ".hidden", "key.",
     "x.tar.gz", "a-b_c.webm"],
)
def test_member_names_split_like_webdataset(name):
    key, extension = base_plus_ext(name)
    expected = None if key is None else (key, extension.lower())
    assert split_member_name(name) == expected


@pytest.mark.parametrize(
    "members,captions",
    [
        ({"txt": b"  a dog runs \n"}, ["a dog runs"]),
        ({"json": json.dumps({"captions": ["one", " ", "two"]}).encode()}, ["one", "two"]),
        ({"json": json.dumps({"caption": "only one"}).encode()}, ["only one"]),
        # img2dataset-style metadata without a caption defers to the .txt
        ({"json": json.dumps({"url": "http://x", "width": 3}).encode(), "txt": b"from txt"}, ["from txt"]),
        ({"json": b"{broken", "txt": b"the txt still works"}, ["the txt still works"]),
        ({"txt": "café au lait ☕".encode()}, ["café au lait ☕"]),
    ],
)
def test_captions_are_read(members, captions):
    assert read_captions(members) == captions


@pytest.mark.parametrize(
    "members,reason",
    [
        ({}, "missing_caption"),
        ({"mp4": b"x"}, "missing_caption"),
        ({"txt": b""}, "empty_caption"),
        ({"txt": b" \n\t "}, "empty_caption"),
        ({"txt": b"caf\xe9 latin-1"}, "caption_not_utf8"),
        ({"json": b"\xff\xfe{}"}, "caption_not_utf8"),
        ({"json": b"[1, 2]"}, "bad_caption_json"),
        ({"json": b"{not json"}, "bad_caption_json"),
        ({"json": json.dumps({"captions": [1, 2]}).encode()}, "bad_caption_json"),
        ({"json": json.dumps({"captions": ["", "  "]}).encode()}, "empty_caption"),
        ({"json": json.dumps({"meta": 1}).encode()}, "missing_caption"),
    ],
)
def test_bad_captions_raise_their_reason(members, reason):
    with pytest.raises(DecodeError) as caught:
        read_captions(members)
    assert caught.value.reason == reason


def test_media_selection_respects_the_source_modality():
    members = {"txt": b"x", "mp4": b"v", "jpg": b"i"}
    assert media_modality(members, None) == ("video", "mp4")
    assert media_modality(members, "image") == ("image", "jpg")
    with pytest.raises(DecodeError) as caught:
        media_modality({"txt": b"x", "png": b"i"}, "video")
    assert caught.value.reason == "wrong_modality"
    with pytest.raises(DecodeError) as caught:
        media_modality({"txt": b"x"}, None)
    assert caught.value.reason == "missing_media"
