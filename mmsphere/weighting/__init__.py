"""Meta-learned per-sample weights: the WeightNet, its meta iteration, and the weighting the loop uses."""

from mmsphere.weighting.meta import MetaStepResult, SharedForward, capture_before_forward, meta_step
from mmsphere.weighting.meta_weighting import MetaWeighting
from mmsphere.weighting.weight_net import WeightNet

__all__ = ["WeightNet", "meta_step", "MetaStepResult", "MetaWeighting", "SharedForward", "capture_before_forward"]
