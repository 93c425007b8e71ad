"""Atomic writes keep the umask's mode: run directories, exports and results are readable by others under umask 022.

``tempfile.mkstemp`` makes 0600 files and safetensors replaces the file it writes by a 0600 one; both
used to leave ``model.safetensors``, ``config.yaml``, ``mmsphere.json``, the export's weights and
``retrieval.json``/``ood.json`` readable by their writer alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmsphere.atomic import atomic_write, write_text_atomic
from mmsphere.models.config import ModelConfig
from mmsphere.train.config import Config
from mmsphere.eval.report import write_json
from mmsphere.models import create_model, export_run, save_run

# umask -> the mode of a file that open() creates under it
UMASKS = {0o022: 0o644, 0o077: 0o600, 0o027: 0o640}


@pytest.fixture(params=sorted(UMASKS), ids=lambda umask: f"umask{umask:03o}")
def umask(request):
    """Run the test under ``request.param`` as the process umask, restored afterwards."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_text_gets_the_umasks_mode(tmp_path, umask):
    path = write_text_atomic(tmp_path / "notes.txt", "hello\n")
    assert path.read_text() == "hello\n"
    assert mode_of(path) == UMASKS[umask]


def test_a_writer_that_replaces_its_file_by_a_0600_one_still_gets_the_umasks_mode(tmp_path, umask):
    with atomic_write(tmp_path / "weights.safetensors", durable=True) as temporary:
        save_file({"weight": torch.arange(3.0)}, str(temporary))  # safetensors writes 0600 whatever the umask
    assert torch.equal(load_file(tmp_path / "weights.safetensors")["weight"], torch.arange(3.0))
    assert mode_of(tmp_path / "weights.safetensors") == UMASKS[umask]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "result.json", "old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_write(path) as temporary:
            temporary.write_text("half a new fi")
            raise RuntimeError("half way")
    assert path.read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [path]


def test_run_directories_exports_and_results_follow_the_umask(tmp_path, umask):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mmsphere-tiny"))
    run_dir = tmp_path / "run"
    save_run(model, Config(model=model.config), run_dir)
    export_run(run_dir, tmp_path / "open_clip")
    write_json(tmp_path / "retrieval.json", {"t2v": {"R@1": 1.0}})
    write_json(tmp_path / "ood.json", {"auroc": 0.5})
    written = {path.relative_to(tmp_path).as_posix(): mode_of(path) for path in tmp_path.rglob("*") if path.is_file()}
    assert {"run/model.safetensors", "run/config.yaml", "run/mmsphere.json", "open_clip/open_clip_model.safetensors",
            "retrieval.json", "ood.json"} <= set(written)
    assert written == {name: UMASKS[umask] for name in written}


def test_feature_cache_files_and_checkpoints_follow_the_umask(tmp_path, umask):
    """Feature files sit beside shared shards and checkpoints are resumed by teammates: both readable under 022."""
    from accelerate import Accelerator

    from mmsphere.data.feature_files import ShardFeatures, write_shard_features
    from mmsphere.train.checkpoint import save_checkpoint

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"\0" * 1024)
    features = ShardFeatures(url=str(shard), records=[{"key": "a"}], reader_skips={}, trunk=torch.zeros(1, 4),
                             frame_mask=None, text_trunk=torch.zeros(1, 4), caption_rows=torch.zeros(1, dtype=torch.long),
                             caption_offsets=torch.tensor([0, 1]))
    write_shard_features(tmp_path / "features" / "train-000000.safetensors", features, "0" * 16)
    assert mode_of(tmp_path / "features" / "train-000000.safetensors") == UMASKS[umask]

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    final = save_checkpoint(Accelerator(cpu=True), tmp_path / "run", 1, {"data_epoch": 0},
                            {"model": model, "optimizer": optimizer}, keep=1)
    files = [path for path in final.iterdir() if path.is_file()]
    assert files and {path.name: mode_of(path) for path in files} == {path.name: UMASKS[umask] for path in files}
