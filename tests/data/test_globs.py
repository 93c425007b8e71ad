"""Shell-style globs in shard arguments (ARCHITECTURE.md, Data): local paths only, sorted, and an empty match is an error."""

import json

import pytest

from mmsphere.cli import main as mmsphere_main
from mmsphere.data.config import DataConfig, SourceConfig
from mmsphere.errors import DataError
from mmsphere.train.config import config_from_dict
from mmsphere.data import build_eval_loader, build_train_stream
from mmsphere.data.reader import check_shards, expand_urls
from mmsphere.train.preflight import check_data_sources

SIZE = 16


def write_image_shards(folder, media, name, shards, per_shard=2):
    """``shards`` tars ``NAME-0.tar`` ... of ``per_shard`` PNG-caption pairs; returns the shard paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        members = []
        for index in range(per_shard):
            key = f"{name}-{shard}-{index}"
            members += [(f"{key}.txt", f"an image {key}".encode()),
                        (f"{key}.png", media.image(20, 18, "PNG", seed=shard * 100 + index))]
        paths.append(str(media.tar(folder / f"{name}-{shard}.tar", members)))
    return paths


def test_a_glob_names_the_matching_files_sorted(tmp_path, media):
    paths = write_image_shards(tmp_path, media, "g", 12, per_shard=1)
    (tmp_path / "g-notes.txt").write_text("not a shard")
    (tmp_path / "g-dir.tar").mkdir()  # a folder is never a shard
    assert expand_urls(str(tmp_path / "g-*.tar")) == sorted(paths)
    assert expand_urls(str(tmp_path / "g-?.tar")) == sorted(paths[:10])
    assert expand_urls(str(tmp_path / "g-[0-2].tar")) == paths[:3]
    assert check_shards(str(tmp_path / "g-1*.tar"), "test") == sorted([paths[1], paths[10], paths[11]])


def test_globs_mix_with_brace_patterns_and_double_colon_sources(tmp_path, media):
    first = write_image_shards(tmp_path / "a", media, "first", 3, per_shard=1)
    second = write_image_shards(tmp_path / "b", media, "second", 2, per_shard=1)
    # braces expand first, then each local result is globbed
    assert expand_urls(str(tmp_path / "{a/first,b/second}-*.tar")) == first + second
    joined = f"{tmp_path}/b/second-{{0..1}}.tar::{tmp_path}/a/*.tar"
    assert expand_urls(joined) == second + first
    assert expand_urls([str(tmp_path / "a" / "*.tar"), second[0]]) == first + second[:1]


def test_pipe_commands_and_remote_urls_are_never_globbed(tmp_path, media):
    write_image_shards(tmp_path, media, "g", 2, per_shard=1)
    pipe = f"pipe:cat {tmp_path}/g-*.tar"
    assert expand_urls(pipe) == [pipe]
    remote = ["https://example.com/shards/train-*.tar", "s3://bucket/train-?.tar"]
    assert expand_urls("::".join(remote)) == remote
    assert expand_urls(f"pipe:aws s3 cp s3://bucket/train-{{0..1}}-*.tar -::{tmp_path}/g-*.tar") == [
        "pipe:aws s3 cp s3://bucket/train-0-*.tar -", "pipe:aws s3 cp s3://bucket/train-1-*.tar -",
        str(tmp_path / "g-0.tar"), str(tmp_path / "g-1.tar")]
    assert check_shards(pipe, "test") == [pipe]  # nothing local to check


def test_a_file_whose_name_looks_like_a_glob_is_taken_literally(tmp_path, media):
    literal = media.tar(tmp_path / "set[1].tar", [("a.txt", b"caption"), ("a.png", media.image())])
    media.tar(tmp_path / "set1.tar", [("b.txt", b"caption"), ("b.png", media.image())])
    assert expand_urls(str(literal)) == [str(literal)]


def test_a_glob_that_matches_nothing_is_a_clear_error(tmp_path, media):
    write_image_shards(tmp_path, media, "g", 1)
    empty = str(tmp_path / "nothing-*.tar")
    with pytest.raises(ValueError, match=r"^where: shard pattern '.*nothing-\*\.tar' names no shard"):
        check_shards(empty, "where")
    # one empty side of '::' is an error too, not silently dropped
    with pytest.raises(ValueError, match=r"nothing-\*\.tar' names no shard"):
        check_shards(f"{tmp_path}/g-0.tar::{empty}", "where")


def test_training_streams_read_a_glob_like_the_equivalent_brace_pattern(tmp_path, media, tokenizer):
    write_image_shards(tmp_path, media, "img", 4, per_shard=3)

    def keys(urls, **fields):
        stream = build_train_stream([SourceConfig(urls=urls, modality="image", name="img")],
                                    DataConfig(frames=1, shuffle_buffer=0, epoch_samples=12, resampled=False, **fields),
                                    image_size=SIZE, image_mean=media.mean, image_std=media.std, tokenizer=tokenizer,
                                    batch_size=3, seed=5)
        return [key for batch in stream for key in batch.keys]

    from_glob = keys(str(tmp_path / "img-*.tar"))
    assert from_glob == keys(str(tmp_path / "img-{0..3}.tar"))
    assert sorted(from_glob) == sorted(f"img-{shard}-{index}" for shard in range(4) for index in range(3))
    with pytest.raises(ValueError, match=r"data source 'img': shard pattern .*absent-\*\.tar' names no shard"):
        keys(str(tmp_path / "absent-*.tar"))


def test_the_evaluation_loader_reads_a_glob_in_shard_order(tmp_path, media):
    write_image_shards(tmp_path / "a", media, "val", 2)
    write_image_shards(tmp_path / "b", media, "extra", 1)
    loader = build_eval_loader(f"{tmp_path}/a/val-*.tar::{tmp_path}/b/extra-{{0..0}}.tar", "image", frames=1,
                               image_size=SIZE, image_mean=media.mean, image_std=media.std, batch_size=4)
    assert [key for batch in loader for key in batch.keys] == [
        "val-0-0", "val-0-1", "val-1-0", "val-1-1", "extra-0-0", "extra-0-1"]
    with pytest.raises(ValueError, match=r"image evaluation shards: shard pattern .*test-\*\.tar' names no shard"):
        build_eval_loader(str(tmp_path / "test-*.tar"), "image", frames=1, image_size=SIZE, image_mean=media.mean,
                          image_std=media.std, batch_size=4)


def test_ood_image_sets_take_a_glob(tmp_path, media):
    from mmsphere.ood.inputs import image_batches

    write_image_shards(tmp_path, media, "ood", 2)
    batches = image_batches(str(tmp_path / "ood-*.tar"), image_size=SIZE, image_mean=media.mean,
                            image_std=media.std, batch_size=8)
    assert [name for batch in batches for name in batch.names] == ["ood-0-0", "ood-0-1", "ood-1-0", "ood-1-1"]


def test_inspect_shards_takes_a_quoted_glob(tmp_path, media, capsys):
    write_image_shards(tmp_path, media, "img", 3)
    assert mmsphere_main(["inspect-shards", str(tmp_path / "img-*.tar"), "--size", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decoded"] == 6
    assert mmsphere_main(["inspect-shards", str(tmp_path / "none-*.tar"), "--json"]) == 2
    assert "none-*.tar' names no shard" in capsys.readouterr().err


def test_the_training_preflight_expands_globs_like_the_pipeline(tmp_path, media):
    write_image_shards(tmp_path, media, "img", 2)

    def config(urls):
        return config_from_dict({"output_dir": str(tmp_path / "run"),
                                 "data": {"train": [{"urls": urls, "modality": "image"}]}})

    check_data_sources(config(str(tmp_path / "img-*.tar")))
    check_data_sources(config(f"{tmp_path}/img-0.tar::{tmp_path}/img-[1].tar"))
    with pytest.raises(DataError, match=r"data\.train\[0\]\.urls=.*: shard pattern .*gone-\*\.tar' names no shard"):
        check_data_sources(config(str(tmp_path / "gone-*.tar")))
