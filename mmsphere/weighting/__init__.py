"""Meta-learned per-sample weights: the WeightNet and its second-order meta step."""

from mmsphere.weighting.meta import MetaStepResult, meta_step
from mmsphere.weighting.weight_net import WeightNet

__all__ = ["WeightNet", "meta_step", "MetaStepResult"]
