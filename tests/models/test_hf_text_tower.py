"""An open_clip architecture with a HuggingFace text tower, built fully offline from a local directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from mmsphere.train.config import Config
from mmsphere.models import load_run, save_run

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "mat", "red", "car", "snow"]
CAPTIONS = ["a cat on the mat", "a red car", "the dog on the snow"]
CONTEXT_LENGTH = 12


@pytest.fixture(scope="module")
def bert_directory(tmp_path_factory) -> Path:
    """A two-layer BERT and its word-piece tokenizer saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)}).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory


@pytest.fixture
def hf_architecture(bert_directory, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = tmp_path / "tiny-bert-vit.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"hf_model_name": str(bert_directory), "hf_tokenizer_name": str(bert_directory),
                     "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": CONTEXT_LENGTH},
    }))
    return str(path)


def test_text_tower_holds_the_saved_bert_weights(make_model, hf_architecture, bert_directory):
    model = make_model(name=hf_architecture)
    saved = BertModel.from_pretrained(bert_directory, add_pooling_layer=False).state_dict()
    tower = model.clip.text.transformer.state_dict()
    assert tower.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(tower[name], value), name


def test_hf_tokenizer_and_text_features(make_model, hf_architecture, bert_directory):
    model = make_model(name=hf_architecture)
    tokens = model.tokenizer(CAPTIONS)
    reference = BertTokenizer.from_pretrained(bert_directory)(
        CAPTIONS, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt")["input_ids"]
    assert model.context_length == CONTEXT_LENGTH
    assert torch.equal(tokens, reference)
    assert (tokens != 1).all(), "every test word is in the vocabulary"
    features = model.encode_text(tokens)
    assert features.shape == (3, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))


def test_parameter_groups_of_an_hf_tower(make_model, hf_architecture):
    model = make_model(name=hf_architecture)
    names = [name for name, _ in model.named_parameters()]
    assert {model.tower_of(name) for name in names if name.startswith("clip.text.")} == {"text"}
    last_layer = {name for name in names if name.startswith("clip.text.transformer.encoder.layer.1.")}
    heads = {"clip.visual.proj", "clip.text.proj.weight"}
    assert set(model.meta_parameter_names("heads")) == heads
    visual_last = {name for name in names if name.startswith("clip.visual.transformer.resblocks.0.")}
    assert set(model.meta_parameter_names("last_blocks", 1)) == heads | last_layer | visual_last


def test_run_directory_round_trip_without_pretrained_text_weights(make_model, hf_architecture, perturb, tmp_path):
    model = make_model(name=hf_architecture)
    perturb(model.clip.text, std=0.05)  # differs from the BERT on disk: the run's weights must win
    save_run(model, Config(model=model.config), tmp_path)
    restored = load_run(tmp_path)
    tokens = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(restored.encode_text(tokens), model.eval().encode_text(tokens), rtol=0, atol=0)
