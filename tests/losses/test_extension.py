"""The README's "Your own objective term" example, run exactly as documented."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as tf

from mmsphere.errors import ConfigError
from mmsphere.train.config import load_config
from mmsphere.losses import TERMS, Objective
from mmsphere.losses import functional as F

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_blocks() -> tuple[str, str]:
    section = README.read_text().split("### Your own objective term", 1)[1].split("\n### ", 1)[0]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    yaml = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return python, yaml


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    python, yaml = _readme_blocks()
    (tmp_path / "my_terms.py").write_text(python)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, yaml
    TERMS.pop("positive_gap", None)
    sys.modules.pop("my_terms", None)


def test_the_readme_term_trains_from_yaml(user_module):
    folder, yaml = user_module
    config_path = folder / "config.yaml"
    config_path.write_text(yaml + "data:\n  train: [{urls: unused.tar}]\n")
    config = load_config(config_path)
    assert "positive_gap" in TERMS
    objective = Objective(config.loss)
    generator = torch.Generator().manual_seed(0)
    raw_image = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    raw_text = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    image, text = tf.normalize(raw_image, dim=1), tf.normalize(raw_text, dim=1)
    output = objective(image, text, 5.0, seed=0)
    # independent: the alignment of Wang & Isola with α = power, and the margin loss, by the functions
    expected_gap = F.alignment(image, text, alpha=2.0)
    torch.testing.assert_close(output.terms["positive_gap"], expected_gap.detach(), rtol=1e-10, atol=1e-12)
    expected = F.angular_margin_loss(image, text, 5.0, 0.1) + 0.1 * expected_gap
    torch.testing.assert_close(output.loss, expected, rtol=1e-10, atol=1e-12)
    output.loss.backward()
    assert torch.isfinite(raw_image.grad).all()


def test_the_readme_term_checks_its_field(user_module):
    folder, yaml = user_module
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.replace("power: 2.0", "power: -1.0") + "data:\n  train: [{urls: unused.tar}]\n")
    with pytest.raises(ConfigError, match=r"loss.terms.positive_gap.power=-1.0 must be > 0"):
        load_config(config_path)


def test_a_term_without_forward_cannot_register():
    from mmsphere.losses import Term, register_term

    class Empty(Term):
        name = "empty"

    with pytest.raises(TypeError, match="must implement forward"):
        register_term(Empty)
    assert "empty" not in TERMS


def test_an_unimportable_module_is_a_clear_error(tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text("loss: {imports: [no_such_module_here]}\ndata:\n  train: [{urls: unused.tar}]\n")
    with pytest.raises(ConfigError, match="loss.imports: cannot import 'no_such_module_here'"):
        load_config(config_path)
