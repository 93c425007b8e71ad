"""Meta-Weight-Net: the WeightNet formula and the second-order meta-gradient, against finite differences."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmsphere.weighting import WeightNet, meta_step


class TinyDualEncoder(nn.Module):
    """Two linear towers over fixed inputs: enough to exercise the virtual step exactly."""

    def __init__(self, dim_in: int = 5, dim_out: int = 3) -> None:
        super().__init__()
        self.image_head = nn.Linear(dim_in, dim_out)
        self.text_head = nn.Linear(dim_in, dim_out)

    def forward(self, text: torch.Tensor, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_features": F.normalize(self.image_head(images), dim=-1),
                "text_features": F.normalize(self.text_head(text), dim=-1),
                "logit_scale": torch.tensor(5.0, dtype=images.dtype)}


def weighted_contrastive(image_features, text_features, logit_scale, weigh):
    """Per-sample symmetric InfoNCE written out here, independent of mmsphere.losses."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits))
    per_sample = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                        + F.cross_entropy(logits.T, labels, reduction="none"))
    weights = torch.ones_like(per_sample) if weigh is None else weigh(per_sample)
    return (weights * per_sample).mean(), per_sample


class ReferenceObjective:
    """The objective protocol of the meta step (evaluate, then reduce) over :func:`weighted_contrastive`."""

    def evaluate(self, image_features, text_features, logit_scale, **_):
        _, per_sample = weighted_contrastive(image_features, text_features, logit_scale, None)
        return SimpleNamespace(per_sample=per_sample)

    def reduce(self, evaluated, sample_weights, weight_normalize):
        weights = torch.ones_like(evaluated.per_sample) if sample_weights is None else sample_weights
        return SimpleNamespace(loss=(weights * evaluated.per_sample).mean())


def test_weight_net_matches_formula():
    torch.manual_seed(0)
    net = WeightNet(hidden=7).double()
    losses = torch.rand(6, dtype=torch.float64) * 4
    w1, b1 = net.hidden.weight[:, 0], net.hidden.bias
    w2, b2 = net.output.weight[0], net.output.bias[0]
    expected = torch.stack([torch.sigmoid((w2 * torch.relu(w1 * loss + b1)).sum() + b2) for loss in losses])
    assert torch.allclose(net(losses).double(), expected)


def test_weight_net_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        WeightNet(4)(torch.zeros(3, 1))


def _meta_loss_of_theta(model, weight_net, theta, train_inputs, meta_inputs, names, virtual_lr):
    """L_meta(ŵ(Θ)) recomputed from scratch for a given flat Θ (for finite differences)."""
    from torch.func import functional_call

    theta_params = {}
    offset = 0
    for name, parameter in weight_net.named_parameters():
        theta_params[name] = theta[offset:offset + parameter.numel()].view_as(parameter)
        offset += parameter.numel()
    virtual = {name: parameter for name, parameter in model.named_parameters() if name in names}
    outputs = functional_call(model, virtual, args=(), kwargs=train_inputs)
    loss, _ = weighted_contrastive(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                                   lambda ps: functional_call(weight_net, theta_params, (ps.detach(),)))
    gradients = torch.autograd.grad(loss, list(virtual.values()))
    stepped = {name: parameter - virtual_lr * gradient for (name, parameter), gradient in zip(virtual.items(), gradients)}
    meta_outputs = functional_call(model, stepped, args=(), kwargs=meta_inputs)
    meta_loss, _ = weighted_contrastive(meta_outputs["image_features"], meta_outputs["text_features"],
                                        meta_outputs["logit_scale"], None)
    return meta_loss.item()


@pytest.mark.parametrize("names", [["image_head.weight", "image_head.bias", "text_head.weight", "text_head.bias"],
                                   ["text_head.weight"]])
def test_meta_gradient_matches_finite_differences(names):
    torch.manual_seed(1)
    model = TinyDualEncoder().double()
    weight_net = WeightNet(hidden=4).double()
    train_inputs = {"text": torch.randn(6, 5, dtype=torch.float64), "images": torch.randn(6, 5, dtype=torch.float64)}
    meta_inputs = {"text": torch.randn(4, 5, dtype=torch.float64), "images": torch.randn(4, 5, dtype=torch.float64)}
    virtual_lr = 0.5
    theta = torch.cat([p.detach().flatten() for p in weight_net.parameters()]).clone()

    epsilon = 1e-6
    numeric = torch.zeros_like(theta)
    for index in range(theta.numel()):
        plus, minus = theta.clone(), theta.clone()
        plus[index] += epsilon
        minus[index] -= epsilon
        numeric[index] = (_meta_loss_of_theta(model, weight_net, plus, train_inputs, meta_inputs, names, virtual_lr)
                          - _meta_loss_of_theta(model, weight_net, minus, train_inputs, meta_inputs, names, virtual_lr)
                          ) / (2 * epsilon)

    model_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # plain SGD with lr 1 makes the applied update equal to the meta-gradient itself
    optimizer = torch.optim.SGD(weight_net.parameters(), lr=1.0)
    result = meta_step(model, ReferenceObjective(), weight_net, optimizer, train_inputs, meta_inputs,
                       parameter_names=names, virtual_lr=virtual_lr)
    analytic = theta - torch.cat([p.detach().flatten() for p in weight_net.parameters()])

    assert numeric.abs().max() > 1e-8, "the meta-gradient should not vanish in this set-up"
    assert torch.allclose(analytic, numeric, rtol=1e-4, atol=1e-8)
    for name, parameter in model.named_parameters():  # the virtual step never touches the model
        assert torch.equal(parameter.detach(), model_before[name])
        assert parameter.grad is None
    # the reported mean weight is that of the WeightNet (before its update) on the train batch's losses
    outputs = model(**train_inputs)
    _, per_sample = weighted_contrastive(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                                         None)
    theta_params, offset = {}, 0
    for name, parameter in weight_net.named_parameters():
        theta_params[name] = theta[offset:offset + parameter.numel()].view_as(parameter)
        offset += parameter.numel()
    from torch.func import functional_call

    expected_mean = functional_call(weight_net, theta_params, (per_sample.detach(),)).mean().item()
    assert result.weight_mean == pytest.approx(expected_mean, rel=1e-9)


def test_meta_step_rejects_unknown_parameter():
    model = TinyDualEncoder()
    weight_net = WeightNet(4)
    inputs = {"text": torch.randn(4, 5), "images": torch.randn(4, 5)}
    with pytest.raises(ValueError, match="unknown parameter"):
        meta_step(model, ReferenceObjective(), weight_net, torch.optim.SGD(weight_net.parameters(), lr=1.0),
                  inputs, inputs, parameter_names=["no.such.weight"], virtual_lr=0.1)
