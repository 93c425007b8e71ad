"""``mmsphere export``: a run's towers in open_clip's local-directory layout, its temporal head beside them.

``open_clip.create_model_and_transforms("local-dir:DIR")`` (and so CLIP_benchmark) reads
``open_clip_config.json`` (``model_cfg``: the architecture dict the model is built from;
``preprocess_cfg``: size, mean, std, interpolation, resize mode of the evaluation transform) and the
weights file it prefers, ``open_clip_model.safetensors``, loaded strictly under open_clip's own names.
``open_clip.get_tokenizer("local-dir:DIR")`` builds an HF tokenizer from DIR itself, so an HF text
tower's tokenizer files are written there too. The architecture travels in the file: the exported
directory loads without mmsphere and without the JSON file the run was configured with.

open_clip has no place for the temporal head, so it is written beside the towers:
``temporal_head.json`` (its config) and, for a head with parameters, ``temporal_head.safetensors``;
:func:`load_temporal_head` rebuilds it. ``README.md`` in DIR says what is there and how to use it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from safetensors.torch import load_model, save_file
from torch import nn

import mmsphere
from mmsphere.atomic import atomic_write
from mmsphere.cli_errors import ArgumentParser, run_cli
from mmsphere.config import build_config
from mmsphere.data.config import DataConfig
from mmsphere.errors import ConfigError, DataError, MmsphereError
from mmsphere.models.config import ModelConfig
from mmsphere.models.dual_encoder import DualEncoder
from mmsphere.models.factory import resolve_architecture
from mmsphere.models.run_dir import load_run
from mmsphere.models.temporal import TEMPORAL_HEADS, build_temporal_head, temporal_heads_for

logger = logging.getLogger(__name__)

FORMATS = ("open_clip",)
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
# the first name open_clip's local-dir loader looks for (factory._find_checkpoint_in_dir)
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
TEMPORAL_CONFIG_FILE = "temporal_head.json"
TEMPORAL_WEIGHTS_FILE = "temporal_head.safetensors"
README_FILE = "README.md"
CLIP_PREFIX = "clip."
# mmsphere's own transform (data/transforms.py): short side to the size with bicubic antialiasing,
# then a centre crop; open_clip's evaluation transform with these settings is the same geometry
INTERPOLATION = "bicubic"
RESIZE_MODE = "shortest"
TOKENIZER_PROBE = ["a photo of a dog playing in the snow", "Two people: one RED car!"]


def export_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, format: str = "open_clip", force: bool = False
) -> dict[str, Path]:
    """Write a run's towers for ``open_clip.create_model_and_transforms("local-dir:OUT")`` and its temporal head.

    Returns the written files by name. ``out_dir`` must not exist, be empty, or (with ``force``)
    hold a previous export, which is then replaced as a whole. Files are written into a sibling
    folder first and moved into place once complete.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not supported; formats: {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    target = _checked_destination(run_dir, out_dir, force)
    model = load_run(run_dir)
    architecture = resolve_architecture(model.config.name)  # load_run registered a JSON file already

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        names = _write_open_clip_directory(model, architecture, staging, run_dir=run_dir, out_dir=out_dir)
        _check_tokenizer(model, staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s (%s)", run_dir, out_dir, ", ".join(names))
    return {name: out_dir / name for name in names}


def load_temporal_head(directory: str | os.PathLike) -> nn.Module:
    """The temporal head of an exported directory (``temporal_head.json`` + weights), in eval mode.

    Apply it to L2-normalised per-frame image features ``[B, T, D]`` with ``frame_mask [B, T]`` and
    L2-normalise its output, as :meth:`DualEncoder.encode_video` does.
    """
    directory = Path(directory)
    config_path = directory / TEMPORAL_CONFIG_FILE
    if not config_path.is_file():
        raise DataError(f"{str(directory)!r} has no {TEMPORAL_CONFIG_FILE}; is it an mmsphere export?")
    try:
        config = json.loads(config_path.read_text())
        model_config = ModelConfig(
            temporal_head=config["temporal_head"],
            temporal_layers=int(config.get("temporal_layers", 1)),
            temporal_heads=int(config.get("temporal_heads", 0)),
            max_frames=int(config.get("max_frames", 32)),
        )
        width = int(config["embed_dim"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise MmsphereError(f"cannot read {str(config_path)!r}: {type(error).__name__}: {error}") from None
    head = build_temporal_head(model_config, width)
    if any(True for _ in head.parameters()):
        weights = directory / TEMPORAL_WEIGHTS_FILE
        if not weights.is_file():
            raise DataError(f"{str(directory)!r} has no {TEMPORAL_WEIGHTS_FILE} for its "
                                    f"{model_config.temporal_head} temporal head")
        load_model(head, str(weights), strict=True)
    return head.eval()


# --------------------------------------------------------------------------------------------
# where the export goes


def _checked_destination(run_dir: Path, out_dir: Path, force: bool) -> Path:
    """The resolved ``out_dir``, after refusing anything an export must not replace."""
    target = out_dir.resolve()
    run = run_dir.resolve()
    if target == run or target in run.parents:
        raise MmsphereError(f"--out {str(out_dir)!r} is or holds the run directory {str(run_dir)!r}; "
                            "choose another directory")
    if not target.exists():
        return target
    if not target.is_dir():
        raise MmsphereError(f"--out {str(out_dir)!r} exists and is not a directory")
    if not any(target.iterdir()):
        return target
    if not (target / OPEN_CLIP_CONFIG_FILE).is_file():
        raise MmsphereError(f"--out {str(out_dir)!r} is not empty and holds no previous export "
                            f"({OPEN_CLIP_CONFIG_FILE}); choose a new or empty directory")
    if not force:
        raise MmsphereError(f"--out {str(out_dir)!r} already holds an export; pass --force (force=True) "
                            "to replace it")
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(staging, target)
        return
    # a previous export (checked by _checked_destination): swap it out, then delete it
    replaced = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.replaced")
    os.rename(target, replaced)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(replaced, target)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# what the export holds


def _write_open_clip_directory(
    model: DualEncoder, architecture: str, directory: Path, *, run_dir: Path, out_dir: Path
) -> list[str]:
    """Write every file of the export into ``directory``; returns their names."""
    model_cfg = open_clip_model_config(model, architecture)
    preprocess_cfg = open_clip_preprocess_config(model)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    _save_tensors(open_clip_state_dict(model), directory / OPEN_CLIP_WEIGHTS_FILE)
    names = [OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE]

    tokenizer_files: list[str] = []
    if model_cfg["text_cfg"].get("hf_tokenizer_name"):
        # open_clip's local-dir tokenizer is always read from the directory itself
        before = set(os.listdir(directory))
        model.tokenizer.save_pretrained(str(directory))
        tokenizer_files = sorted(set(os.listdir(directory)) - before)
        names += tokenizer_files

    temporal = temporal_head_config(model)
    (directory / TEMPORAL_CONFIG_FILE).write_text(json.dumps(temporal, indent=2) + "\n")
    names.append(TEMPORAL_CONFIG_FILE)
    if any(True for _ in model.temporal.parameters()):
        state = {name: tensor.detach().contiguous() for name, tensor in model.temporal.state_dict().items()}
        _save_tensors(state, directory / TEMPORAL_WEIGHTS_FILE)
        names.append(TEMPORAL_WEIGHTS_FILE)

    readme = _readme(model, architecture, model_cfg, preprocess_cfg, temporal, tokenizer_files,
                     run_dir=run_dir, out_dir=out_dir)
    (directory / README_FILE).write_text(readme)
    names.append(README_FILE)
    return names


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    # through atomic_write for its mode: safetensors alone leaves a 0600 file that nobody else can load
    with atomic_write(path) as temporary:
        save_file(state, str(temporary), metadata={"format": "pt"})


def open_clip_model_config(model: DualEncoder, architecture: str) -> dict[str, Any]:
    """open_clip's ``model_cfg`` of the run: the full architecture dict the towers were built from."""
    model_cfg = open_clip.get_model_config(architecture)
    if model_cfg is None:
        raise MmsphereError(f"open_clip does not know the architecture {architecture!r} of the run")
    model_cfg = copy.deepcopy(model_cfg)
    # the exported weights hold everything: no tower may fetch its own pretrained weights
    if "timm_model_name" in model_cfg.get("vision_cfg", {}):
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        model_cfg["text_cfg"]["hf_model_pretrained"] = False
    logit_bias = getattr(model.clip, "logit_bias", None)
    if logit_bias is not None and model_cfg.get("init_logit_bias") is None:
        # open_clip creates the logit_bias parameter only when the config has an initial value
        model_cfg["init_logit_bias"] = float(logit_bias.detach().flatten()[0])
    return model_cfg


def open_clip_preprocess_config(model: DualEncoder) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg``: the run's image size, mean and std with mmsphere's resize and crop."""
    return asdict(PreprocessCfg(size=model.image_size, mean=tuple(model.image_mean), std=tuple(model.image_std),
                                interpolation=INTERPOLATION, resize_mode=RESIZE_MODE))


def open_clip_state_dict(model: DualEncoder) -> dict[str, torch.Tensor]:
    """The ``clip.*`` tensors under open_clip's own names (the prefix removed), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    storages: set[tuple[torch.device, int]] = set()
    for name, tensor in model.state_dict().items():
        if not name.startswith(CLIP_PREFIX):
            continue
        tensor = tensor.detach()
        pointer = (tensor.device, tensor.untyped_storage().data_ptr())
        if pointer[1] and pointer in storages:
            # tied weights: safetensors writes a storage once, but open_clip loads every name strictly
            tensor = tensor.clone()
        storages.add(pointer)
        state[name[len(CLIP_PREFIX):]] = tensor.cpu().contiguous()
    return state


def temporal_head_config(model: DualEncoder) -> dict[str, Any]:
    """What :func:`load_temporal_head` rebuilds the head from, plus the frames per video the run used."""
    # every head's settings, whichever head reads them: a registered head is rebuilt from the same fields
    bounded = TEMPORAL_HEADS.lookup(model.config.temporal_head).bounded_by_max_frames
    config: dict[str, Any] = {
        "temporal_head": model.config.temporal_head, "embed_dim": model.embed_dim,
        "temporal_layers": model.config.temporal_layers,
        "temporal_heads": temporal_heads_for(model.config, model.embed_dim) if bounded else model.config.temporal_heads,
        "max_frames": model.config.max_frames}
    if any(True for _ in model.temporal.parameters()):
        config["weights"] = TEMPORAL_WEIGHTS_FILE
    if model.run_config is not None:
        config["frames"] = _run_data(model).frames
    return config


def _run_data(model: DualEncoder) -> DataConfig:
    """The ``data`` section of the run ``model`` was loaded from (``load_run``)."""
    return build_config(DataConfig, model.run_config.get("data"), "data.")


def _check_tokenizer(model: DualEncoder, directory: Path) -> None:
    """open_clip's tokenizer for the directory must give the run's tokens (it picks its kind from model_cfg)."""
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    expected, actual = model.tokenizer(TOKENIZER_PROBE), tokenizer(TOKENIZER_PROBE)
    if expected.shape != actual.shape or not torch.equal(expected, actual):
        raise MmsphereError(f"open_clip's tokenizer for the export ({type(tokenizer).__name__}) tokenises "
                            f"differently from the run's ({type(model.tokenizer).__name__}); the export "
                            "would not reproduce the run's text features")


# --------------------------------------------------------------------------------------------
# README.md of the export


def _readme(
    model: DualEncoder,
    architecture: str,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any],
    temporal: dict[str, Any],
    tokenizer_files: list[str],
    *,
    run_dir: Path,
    out_dir: Path,
) -> str:
    out = str(out_dir)
    mean = ", ".join(f"{value:g}" for value in preprocess_cfg["mean"])
    std = ", ".join(f"{value:g}" for value in preprocess_cfg["std"])
    files = [
        f"- `{OPEN_CLIP_CONFIG_FILE}`: `model_cfg`, the `{architecture}` architecture, and `preprocess_cfg`, the "
        f"preprocessing the run used: {preprocess_cfg['size']} px, short side resized ({INTERPOLATION}) then "
        f"centre-cropped, mean ({mean}), std ({std}).",
        f"- `{OPEN_CLIP_WEIGHTS_FILE}`: the image and text towers and `logit_scale`, under open_clip's names.",
    ]
    if tokenizer_files:
        files.append(f"- {', '.join(f'`{name}`' for name in tokenizer_files)}: the text tower's tokenizer "
                     "(open_clip reads it from this directory).")
    files.append(f"- `{TEMPORAL_CONFIG_FILE}`: the temporal head that pools frame features into a video "
                 f"feature (`{temporal['temporal_head']}`).")
    if "weights" in temporal:
        files.append(f"- `{TEMPORAL_WEIGHTS_FILE}`: its weights (open_clip has no place for them).")

    notes = []
    hf_model_name = model_cfg["text_cfg"].get("hf_model_name")
    if hf_model_name:
        notes.append(f"The text tower is a Hugging Face model: transformers reads its architecture (config.json, "
                     f"not its weights) from `{hf_model_name}`, which must exist where you load it (a Hub id "
                     "needs network access or a filled cache).")
    trained_size = _run_data(model).image_size if model.run_config is not None else None
    if trained_size is not None and trained_size != model.image_size:
        notes.append(f"The run trained on {trained_size} px frames (`data.image_size`); like mmsphere's own "
                     f"evaluation tools, open_clip evaluates at the model's {model.image_size} px.")

    frames = temporal.get("frames")
    frames_note = f" The run trained on {frames} frames per video, sampled uniformly over the clip." if frames else ""
    if temporal["temporal_head"] != "mean":
        head = TEMPORAL_HEADS.lookup(temporal["temporal_head"])
        details = ", ".join(([head.paper] if head.paper else [])
                            + ([f"at most {temporal['max_frames']} frames"] if head.bounded_by_max_frames else []))
        video = (
            f"The run pools frames with the `{head.name}` temporal head{f' ({details})' if details else ''}."
            f"{frames_note} Rebuild it with mmsphere installed (and the module registering it, if it is yours) and "
            "apply it to the L2-normalised frame features:\n\n"
            "```python\n"
            "import torch.nn.functional as F\n"
            "from mmsphere.models import load_temporal_head\n\n"
            f"head = load_temporal_head({out!r})\n"
            "# frames: [B, T, 3, H, W], each frame preprocessed as an image; frame_mask: [B, T] bool, False = padding\n"
            "frame_features = F.normalize(model.encode_image(frames.flatten(0, 1)), dim=-1)\n"
            "frame_features = frame_features.view(*frames.shape[:2], -1)\n"
            "video_features = F.normalize(head(frame_features, frame_mask), dim=-1)\n"
            "```\n"
        )
    else:
        video = (
            "The run pools frames with the mean head (CLIP4Clip meanP): it has no weights, so there is "
            f"nothing to load; average the L2-normalised frame features over the valid frames.{frames_note}\n\n"
            "```python\n"
            "import torch.nn.functional as F\n\n"
            "# frames: [B, T, 3, H, W], each frame preprocessed as an image; frame_mask: [B, T] bool, False = padding\n"
            "frame_features = F.normalize(model.encode_image(frames.flatten(0, 1)), dim=-1)\n"
            "frame_features = frame_features.view(*frames.shape[:2], -1)\n"
            "valid = frame_mask.unsqueeze(-1)\n"
            "pooled = frame_features.masked_fill(~valid, 0).sum(1) / valid.sum(1)\n"
            "video_features = F.normalize(pooled, dim=-1)\n"
            "```\n"
        )

    sections = [
        f"# `{run_dir}` for open_clip\n",
        f"Exported by `mmsphere export` (mmsphere {mmsphere.__version__}) from the run directory `{run_dir}` "
        "in open_clip's local-directory layout.\n",
        "## Files\n",
        "\n".join(files) + "\n",
        "## Load it with open_clip\n",
        "```python\n"
        "import open_clip\n\n"
        f"model, _, preprocess = open_clip.create_model_and_transforms({'local-dir:' + out!r})\n"
        f"tokenizer = open_clip.get_tokenizer({'local-dir:' + out!r})\n"
        "model.eval()\n"
        "```\n",
        "`model.encode_image(preprocess(image)[None], normalize=True)` and "
        "`model.encode_text(tokenizer(texts), normalize=True)` give the image and text features of "
        f"`mmsphere.load({str(run_dir)!r})`.\n",
        *(note + "\n" for note in notes),
        "## Benchmark it with CLIP_benchmark\n",
        "```bash\n"
        f"clip_benchmark eval --model_type open_clip --model local-dir:{out} --pretrained '' \\\n"
        "    --dataset cifar10 --task zeroshot_classification --dataset_root datasets/cifar10 \\\n"
        "    --output cifar10.json\n"
        "```\n",
        "`--pretrained` is ignored for a `local-dir:` model; give `--output` a plain file name (its "
        "`{model}` placeholder would put the directory's path into the file name).\n",
        "## Video: the temporal head\n",
        video,
    ]
    return "\n".join(sections)


# --------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    """``mmsphere export RUN_DIR --out DIR [--format open_clip] [--force]``."""
    parser = ArgumentParser(
        prog="mmsphere export",
        description="Write a run's towers in open_clip's local-directory layout "
                    "(open_clip.create_model_and_transforms('local-dir:DIR'), CLIP_benchmark), "
                    "its temporal head and a README beside them.")
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory written by mmsphere train")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (new or empty)")
    parser.add_argument("--format", choices=FORMATS, default="open_clip", help="export format (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace a previous export in --out")
    return run_cli(parser, sys.argv[1:] if argv is None else argv, run_export)


def run_export(args: argparse.Namespace) -> int:
    """Export the run and print where it went and how to load it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    files = export_run(args.run, args.out, format=args.format, force=args.force)
    print(f"exported {args.run} to {args.out}: {', '.join(files)}")
    print(f"load it with open_clip.create_model_and_transforms('local-dir:{args.out}'); see {files[README_FILE]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
