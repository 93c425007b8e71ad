"""The dual encoder: an open_clip model plus a temporal head, returning unit-norm features.

Video frames ``[B, T, 3, H, W]`` go through the image tower all at once, are L2-normalised, pooled
over time by the temporal head and L2-normalised again (CLIP4Clip). ``forward`` returns exactly the
keyword arguments of the objective: ``image_features``, ``text_features`` and ``logit_scale``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from mmsphere.errors import ConfigError
from mmsphere.models.config import ModelConfig
from mmsphere.models.partial import block_input, from_block, modules_from
from mmsphere.models.temporal import build_temporal_head

TOWERS = ("image", "text", "temporal", "logit_scale")
META_PARAMETER_MODES = ("all", "last_blocks", "heads")
# direct children of a tower that map its pooled output into the joint space, by open_clip tower type:
# VisionTransformer.proj, TimmModel.head, ModifiedResNet.attnpool; CLIP.text_projection (native text
# tower flattened into CLIP), TextTransformer.text_projection and HFTextEncoder.proj (CustomTextCLIP)
IMAGE_HEAD_NAMES = ("proj", "head", "attnpool")
TEXT_HEAD_NAMES = ("text_projection", "proj")


class DualEncoder(nn.Module):
    """An open_clip image-text model with a temporal head; every ``encode_*`` returns unit-norm ``[B, D]``."""

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        config: ModelConfig,
        *,
        embed_dim: int,
        image_size: int,
        image_mean: tuple[float, float, float],
        image_std: tuple[float, float, float],
        context_length: int,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.temporal = build_temporal_head(config, embed_dim)
        self.tokenizer = tokenizer
        self.config = config
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.image_mean = tuple(float(value) for value in image_mean)
        self.image_std = tuple(float(value) for value in image_std)
        self.context_length = context_length
        self.run_config: dict[str, Any] | None = None  # set by load_run: the run's config.yaml as plain data
        self.architecture_config: dict | None = None  # the resolved open_clip config, set by create_model
        heads = self.head_prefixes()
        blocks = set(self.last_block_parameter_names(config.trainable_blocks)) if config.trainable_blocks else set()
        for name, parameter in self.named_parameters():
            tower = self.tower_of(name)
            if (tower == "image" and config.freeze_image) or (tower == "text" and config.freeze_text):
                parameter.requires_grad_(False)
            elif config.trainable != "all" and tower in ("image", "text") and name not in blocks and not any(
                    _under(name, prefix) for prefix in heads):
                parameter.requires_grad_(False)
        if config.gradient_checkpointing:
            self.clip.set_grad_checkpointing(True)
        self.train()

    def train(self, mode: bool = True) -> DualEncoder:
        """Set training mode; fully frozen modules stay in eval mode (fixed BatchNorm statistics, no dropout)."""
        super().train(mode)
        if mode:
            # a frozen tower is a fixed feature extractor: in train mode its BatchNorm layers would
            # normalise with batch statistics and drift their running ones, and its dropout would
            # perturb the features the trainable heads see
            for module in self.clip.modules():
                parameters = list(module.parameters())
                if parameters and not any(parameter.requires_grad for parameter in parameters):
                    module.eval()
        return self

    # ----------------------------------------------------------------------------------------
    # encoders

    @property
    def log_logit_scale(self) -> nn.Parameter:
        """The learnable log of the logit multiplier (open_clip's ``logit_scale`` parameter)."""
        return self.clip.logit_scale

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` (``L`` = context length) -> unit-norm text features ``[B, D]``."""
        return _normalize(self._text_unnormalized(text))

    def _text_unnormalized(self, text: torch.Tensor) -> torch.Tensor:
        self._check_text(text)
        return self.clip.encode_text(text)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> unit-norm image features ``[B, D]``; bypasses the temporal head."""
        return _normalize(self._image_unnormalized(images))

    def _image_unnormalized(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images, "images", expected_dim=4)
        return self.clip.encode_image(images)

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Frames ``[B, T, 3, H, W]`` with ``frame_mask [B, T]`` (None = all valid) -> unit-norm ``[B, D]``."""
        return _normalize(self._video_unnormalized(frames, frame_mask))

    def _video_unnormalized(self, frames: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        self._check_images(frames, "frames", expected_dim=5)
        batch, length = frames.shape[:2]
        frame_mask = self._checked_frame_mask(frame_mask, frames)
        frame_features = self.clip.encode_image(frames.flatten(0, 1))
        frame_features = _normalize(frame_features).view(batch, length, -1)
        return self.temporal(frame_features, frame_mask)

    def encode_visual(
        self,
        images: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        *,
        image_trunk: torch.Tensor | None = None,
        frame_trunk: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unit-norm features ``[B, D]`` of one visual input: the keyword arguments of ``Batch.media_inputs()``."""
        return _normalize(self._visual_unnormalized(images, frames, frame_mask, image_trunk, frame_trunk))

    def _visual_unnormalized(self, images, frames, frame_mask, image_trunk, frame_trunk) -> torch.Tensor:
        if images is not None:
            return self._image_unnormalized(images)
        if frames is not None:
            return self._video_unnormalized(frames, frame_mask)
        if image_trunk is not None:
            return self._apply_head("image", image_trunk)
        if frame_trunk is not None:
            return self._video_trunk_unnormalized(frame_trunk, frame_mask)
        raise ValueError("pass one of images [B, 3, H, W], frames [B, T, 3, H, W], image_trunk or frame_trunk")

    def forward(
        self,
        text: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        *,
        text_trunk: torch.Tensor | None = None,
        image_trunk: torch.Tensor | None = None,
        frame_trunk: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Features of a batch of pairs: ``image_features``, ``text_features`` and the multiplier ``logit_scale``.

        Pass one text input (``text [B, L]`` token ids, or ``text_trunk``) and one visual input
        (``images [B, 3, H, W]``, ``frames [B, T, 3, H, W]`` + ``frame_mask``, or their trunk
        features ``image_trunk [B, ...]`` / ``frame_trunk [B, T, ...]`` + ``frame_mask`` from a
        feature cache: then only the heads run).
        """
        if self.config.trainable_blocks and text_trunk is not None:
            if text is None:
                raise ValueError("model.trainable=last_blocks: text_trunk (the first trainable block's input) "
                                 "goes with the batch's token ids, text [B, L]")
        elif (text is None) == (text_trunk is None):
            raise ValueError("pass exactly one of text [B, L] or text_trunk [B, ...]")
        visuals = {"images": images, "frames": frames, "image_trunk": image_trunk, "frame_trunk": frame_trunk}
        given = [name for name, value in visuals.items() if value is not None]
        if len(given) != 1:
            raise ValueError("pass exactly one of images [B, 3, H, W], frames [B, T, 3, H, W], image_trunk or "
                             f"frame_trunk; got {given or 'none'}")
        visual_name = given[0]
        if frame_mask is not None and visual_name not in ("frames", "frame_trunk"):
            raise ValueError(f"frame_mask goes with frames or frame_trunk, not with {visual_name}")
        visual, textual = visuals[visual_name], text if text is not None else text_trunk
        if textual.ndim >= 1 and visual.ndim >= 1 and textual.shape[0] != visual.shape[0]:
            raise ValueError(
                f"{'text' if text is not None else 'text_trunk'} of shape {tuple(textual.shape)} and {visual_name} "
                f"of shape {tuple(visual.shape)} must hold the same number of samples"
            )
        visual = self._visual_unnormalized(images, frames, frame_mask, image_trunk, frame_trunk)
        if text_trunk is not None:
            textual = self._apply_head("text", text_trunk, text)
        else:
            textual = self._text_unnormalized(text)
        outputs = {
            "image_features": _normalize(visual),
            "text_features": _normalize(textual),
            "logit_scale": self.clip.logit_scale.exp(),
            # the norms before L2 normalisation (SphereFace-R's "none"/"soft" scale rows by them)
            "image_norms": _norms(visual),
            "text_norms": _norms(textual),
        }
        if getattr(self.clip, "logit_bias", None) is not None:
            # SigLIP's learnable bias (model.init_logit_bias); a computed tensor like logit_scale, not the
            # parameter itself: DDP marks a parameter returned as-is ready twice under accumulation
            outputs["logit_bias"] = self.clip.logit_bias.clone()
        return outputs

    # ----------------------------------------------------------------------------------------
    # trunks and heads: the split a feature cache relies on (mmsphere.cache)

    @torch.no_grad()
    def image_trunk_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> what the image tower computes before its first trainable part.

        ``model.trainable=heads``: the projection head's input; ``last_blocks=K``: the input of the first
        of the last K blocks (:meth:`block_inputs`).
        """
        self._check_images(images, "images", expected_dim=4)
        if self.config.trainable_blocks:
            return self.block_inputs("image", images)
        with self._heads_bypassed():
            return self.clip.encode_image(images)

    @torch.no_grad()
    def text_trunk_features(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` -> what the text tower computes before its first trainable part (as for images)."""
        self._check_text(text)
        if self.config.trainable_blocks:
            return self.block_inputs("text", text)
        with self._heads_bypassed():
            return self.clip.encode_text(text)

    def encode_image_trunk(self, image_trunk: torch.Tensor) -> torch.Tensor:
        """Image trunk features ``[B, ...]`` -> unit-norm image features ``[B, D]`` (the head only)."""
        return _normalize(self._apply_head("image", image_trunk))

    def encode_video_trunk(self, frame_trunk: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Frame trunk features ``[B, T, ...]`` with ``frame_mask [B, T]`` -> unit-norm ``[B, D]``."""
        return _normalize(self._video_trunk_unnormalized(frame_trunk, frame_mask))

    def _video_trunk_unnormalized(self, frame_trunk: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        if frame_trunk.ndim < 3:
            raise ValueError(f"frame_trunk must have shape [B, T, ...], got {tuple(frame_trunk.shape)}")
        batch, length = frame_trunk.shape[:2]
        frame_mask = self._checked_frame_mask(frame_mask, frame_trunk)
        frame_features = _normalize(self._apply_head("image", frame_trunk.flatten(0, 1))).view(batch, length, -1)
        return self.temporal(frame_features, frame_mask)

    def encode_text_trunk(self, text_trunk: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Text trunk features ``[B, ...]`` -> unit-norm text features ``[B, D]`` (the trainable part only;
        ``last_blocks``: with the token ids ``text [B, L]``)."""
        return _normalize(self._apply_head("text", text_trunk, text))

    def trunk_parameter_names(self) -> list[str]:
        """Names of the image and text tower parameters outside the projection heads (the trunks)."""
        heads = self.head_prefixes()
        blocks = set(self.last_block_parameter_names(self.config.trainable_blocks)) if self.config.trainable_blocks \
            else set()
        return [name for name, _ in self.named_parameters() if self.tower_of(name) in ("image", "text")
                and name not in blocks and not any(_under(name, prefix) for prefix in heads)]

    def head_slots(self) -> dict[str, tuple[nn.Module, str]]:
        """Per tower (``image``, ``text``), the module owning its projection head and the attribute's name."""
        if not hasattr(self, "_head_slot_paths"):
            # found once, on the module's own parameters: under torch.func.functional_call (meta step) the
            # heads are plain tensors, no longer recognisable as parameters
            self._head_slot_paths = self._find_head_slots()
        return {tower: (self.get_submodule(owner), name) for tower, (owner, name) in self._head_slot_paths.items()}

    def _find_head_slots(self) -> dict[str, tuple[str, str]]:
        image = [name for name in IMAGE_HEAD_NAMES if _has_parameters(self.clip.visual, name)]
        slots: dict[str, tuple[str, str]] = {}
        if image:
            slots["image"] = ("clip.visual", image[0])
        if _has_parameters(self.clip, "text_projection"):
            slots["text"] = ("clip", "text_projection")
        else:
            text_tower = getattr(self.clip, "text", None)
            names = [name for name in TEXT_HEAD_NAMES if isinstance(text_tower, nn.Module)
                     and _has_parameters(text_tower, name)]
            if names:
                slots["text"] = ("clip.text", names[0])
        for tower in ("image", "text"):
            if tower not in slots:
                raise ValueError(f"the {tower} tower of this model has no projection head with parameters "
                                 f"({', '.join(IMAGE_HEAD_NAMES if tower == 'image' else TEXT_HEAD_NAMES)}): "
                                 "its trunk and head cannot be split")
        return slots

    def _apply_head(self, tower: str, trunk: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.trainable_blocks:
            return self.encode_from_blocks(tower, trunk, text)
        owner, name = self.head_slots()[tower]
        head = getattr(owner, name)
        # open_clip applies a parameter head as a right matrix product (pooled @ proj), a module head by calling it
        return head(trunk) if isinstance(head, nn.Module) else trunk @ head

    @contextlib.contextmanager
    def _heads_bypassed(self) -> Iterator[None]:
        """Within the block, each tower returns its head's input: a parameter head is None, a module head Identity."""
        saved = [(owner, name, getattr(owner, name)) for owner, name in self.head_slots().values()]
        try:
            for owner, name, head in saved:
                # open_clip skips a parameter head that is None (`if self.proj is not None`)
                setattr(owner, name, nn.Identity() if isinstance(head, nn.Module) else None)
            yield
        finally:
            for owner, name, head in saved:
                setattr(owner, name, head)

    # ----------------------------------------------------------------------------------------
    # parameter groups

    def tower_of(self, parameter_name: str) -> str:
        """``"image"``, ``"text"``, ``"temporal"`` or ``"logit_scale"`` for a name of ``named_parameters()``."""
        if parameter_name in ("clip.logit_scale", "clip.logit_bias"):
            return "logit_scale"
        if parameter_name.startswith("temporal."):
            return "temporal"
        if parameter_name.startswith("clip.visual."):
            return "image"
        if parameter_name.startswith("clip."):
            # open_clip's CLIP keeps the text tower's modules at top level, CustomTextCLIP under .text
            return "text"
        raise ValueError(
            f"{parameter_name!r} is not a parameter name of the dual encoder "
            "(names start with 'clip.' or 'temporal.')"
        )

    def frozen_state_names(self) -> list[str]:
        """State-dict names that training never changes: frozen parameters and the buffers of fully frozen modules."""
        parameters = dict(self.named_parameters(remove_duplicate=False))
        # the modules train() keeps in eval mode (parameters, none trainable): their buffers (BatchNorm
        # statistics) stay fixed too; a buffer anywhere else may move in train mode and is saved with the heads
        frozen_modules = [name for name, module in self.clip.named_modules(prefix="clip", remove_duplicate=False)
                          if (owned := list(module.parameters()))
                          and not any(parameter.requires_grad for parameter in owned)]
        names = []
        for name in self.state_dict():
            if name in parameters:
                if not parameters[name].requires_grad:
                    names.append(name)
            elif any(_under(name.rpartition(".")[0], module) for module in frozen_modules):
                names.append(name)
        return names

    def meta_parameter_names(self, mode: str, last_blocks: int = 1) -> list[str]:
        """Trainable parameters taking the Meta-Weight-Net virtual step: ``all``, ``heads`` or ``last_blocks``.

        ``heads`` = both projection heads and the temporal head (not ``logit_scale``); ``last_blocks``
        adds the last ``last_blocks`` blocks of each tower's block stack.
        """
        if mode not in META_PARAMETER_MODES:
            raise ConfigError(f"meta.params={mode!r} must be one of {', '.join(META_PARAMETER_MODES)}")
        if last_blocks < 1:
            raise ConfigError(f"meta.last_blocks={last_blocks} must be >= 1")
        trainable = [name for name, parameter in self.named_parameters() if parameter.requires_grad]
        if mode == "all":
            return trainable
        prefixes = ["temporal"] + self.head_prefixes()
        if mode == "last_blocks":
            for stack_name, stack in self._block_stacks().values():
                for index in range(max(0, len(stack) - last_blocks), len(stack)):
                    prefixes.append(f"{stack_name}.{index}")
        return [name for name in trainable if any(_under(name, prefix) for prefix in prefixes)]

    def _split(self, tower: str) -> tuple[nn.Module, str, int]:
        """(owner, attribute, start) of the tower's block stack at ``model.trainable=last_blocks=K``."""
        count = self.config.trainable_blocks
        if count is None:
            raise ValueError(f"model.trainable={self.config.trainable!r}: the towers are not split at a block")
        stack_name, stack = self._block_stacks()[tower]
        owner_name, _, attribute = stack_name.rpartition(".")
        return self.get_submodule(owner_name), attribute, len(stack) - count

    @torch.no_grad()
    def block_inputs(self, tower: str, inputs: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` or token ids ``[B, L]`` -> the input of the tower's first trainable block ``[B, ...]``."""
        owner, attribute, start = self._split(tower)
        encode = self.clip.encode_image if tower == "image" else self.clip.encode_text
        return block_input(lambda: encode(inputs), getattr(owner, attribute), start)

    def encode_from_blocks(self, tower: str, cached: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """The tower's unnormalised output from its first trainable block's input (text: with its token ids)."""
        owner, attribute, start = self._split(tower)
        with from_block(owner, attribute, start, cached):
            if tower == "image":
                # the modules before the stack run on one blank image: their output is replaced
                return self.clip.encode_image(cached.new_zeros(1, 3, self.image_size, self.image_size))
            if text is None or text.shape[0] != cached.shape[0]:
                raise ValueError("the text tower resumes from a block with the batch's token ids (its pooling reads them)")
            return self.clip.encode_text(text)

    def last_block_parameter_names(self, count: int) -> list[str]:
        """Parameters of the last ``count`` blocks of each tower's stack and of every module the tower runs after them."""
        found = self.__dict__.setdefault("_last_block_names", {})
        if count not in found:  # the names are fixed once the towers are built; finding them runs both towers
            found[count] = self._find_last_block_parameter_names(count)
        return list(found[count])

    def _find_last_block_parameter_names(self, count: int) -> list[str]:
        names = []
        probes = {"image": lambda: self.clip.encode_image(torch.zeros(1, 3, self.image_size, self.image_size)),
                  "text": lambda: self.clip.encode_text(self.tokenizer(["a"]))}
        for tower, (stack_name, stack) in self._block_stacks().items():
            if tower not in probes:
                continue
            if count > len(stack):
                raise ConfigError(f"model.trainable=last_blocks={count}: the {tower} tower's stack {stack_name} "
                                  f"has {len(stack)} blocks")
            start = len(stack) - count
            root = self.clip.visual if tower == "image" else self.clip
            after = {id(module) for module in modules_from(probes[tower], root, stack, start)}
            for module_name, module in self.clip.named_modules(prefix="clip"):
                if id(module) in after and self.tower_of(f"{module_name}.x") == tower:
                    names += [f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False)]
            names += [f"{stack_name}.{index}.{name}" for index in range(start, len(stack))
                      for name, _ in stack[index].named_parameters()]
        return sorted(set(names))

    def head_prefixes(self) -> list[str]:
        """Parameter-name prefixes of the projection heads of both towers (what trains with model.trainable=heads)."""
        prefixes = [f"clip.visual.{name}" for name in IMAGE_HEAD_NAMES if _has_parameters(self.clip.visual, name)]
        if _has_parameters(self.clip, "text_projection"):
            prefixes.append("clip.text_projection")
        text_tower = getattr(self.clip, "text", None)
        if isinstance(text_tower, nn.Module):
            prefixes += [f"clip.text.{name}" for name in TEXT_HEAD_NAMES if _has_parameters(text_tower, name)]
        return prefixes

    def _block_stacks(self) -> dict[str, tuple[str, nn.Module]]:
        """Per tower, the stack of identical blocks holding the most parameters (its residual blocks)."""
        best: dict[str, tuple[int, str, nn.Module]] = {}
        for name, module in self.clip.named_modules():
            if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
                continue
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(parameter.numel() for parameter in module.parameters())
            if size == 0:
                continue
            tower = self.tower_of(f"clip.{name}.0")
            if tower not in best or size > best[tower][0]:
                best[tower] = (size, f"clip.{name}", module)
        return {tower: (name, module) for tower, (_, name, module) in best.items()}

    # ----------------------------------------------------------------------------------------
    # checks at the seam

    def _check_text(self, text: torch.Tensor) -> None:
        if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.is_floating_point():
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"text must be integer token ids of shape [B, {self.context_length}], got {shape}")
        if text.shape[1] != self.context_length:
            raise ValueError(
                f"text of shape {tuple(text.shape)} must have the model's context length "
                f"{self.context_length} (tokenise with model.tokenizer)"
            )

    def _check_images(self, images: torch.Tensor, name: str, expected_dim: int) -> None:
        layout = "[B, 3, H, W]" if expected_dim == 4 else "[B, T, 3, H, W]"
        if not isinstance(images, torch.Tensor) or images.ndim != expected_dim:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{name} must have shape {layout}, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{name} must be normalised floating-point pixels, got dtype {images.dtype}")
        if images.shape[-3] != 3 or 0 in images.shape:
            raise ValueError(f"{name} must have shape {layout} with 3 channels, got {tuple(images.shape)}")
        visual = self.clip.visual
        # open_clip's ViT has a fixed positional-embedding grid; other towers accept other sizes
        if isinstance(visual, VisionTransformer) and tuple(images.shape[-2:]) != tuple(visual.image_size):
            raise ValueError(
                f"{name} of shape {tuple(images.shape)} must be {tuple(visual.image_size)} pixels "
                f"for this ViT (model.image_size={self.image_size})"
            )

    def _checked_frame_mask(self, frame_mask: torch.Tensor | None, frames: torch.Tensor) -> torch.Tensor:
        batch, length = frames.shape[:2]
        if frame_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=frames.device)
        if not isinstance(frame_mask, torch.Tensor) or frame_mask.dtype != torch.bool:
            kind = frame_mask.dtype if isinstance(frame_mask, torch.Tensor) else type(frame_mask).__name__
            raise ValueError(f"frame_mask must be a bool tensor [B, T], got {kind}")
        if tuple(frame_mask.shape) != (batch, length):
            raise ValueError(
                f"frame_mask of shape {tuple(frame_mask.shape)} does not match frames of shape {tuple(frames.shape)}"
            )
        empty = (~frame_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"frame_mask rows {empty} have no valid frame; every video needs at least one")
        return frame_mask.to(frames.device)


def _normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in at least fp32, also inside an autocast region.

    Normalised in bf16 (CPU autocast), rows are off unit norm by up to ~4e-3, which the objective
    rightly rejects once accelerate has converted the outputs to fp32.
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.normalize(features.to(dtype), dim=-1)


def _norms(features: torch.Tensor) -> torch.Tensor:
    """Row norms ``[B]`` in at least fp32 (with gradient), also inside an autocast region."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        return torch.linalg.vector_norm(features.to(dtype), dim=-1)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _has_parameters(module: nn.Module, attribute: str) -> bool:
    value = getattr(module, attribute, None)
    if isinstance(value, nn.Parameter):
        return True
    return isinstance(value, nn.Module) and any(True for _ in value.parameters())
