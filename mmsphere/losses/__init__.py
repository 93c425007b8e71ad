"""Objective terms on the unit hypersphere: pure functions, their registry and the composed objective.

``mmsphere.losses.functional`` holds the eight functions of DESIGN §1, ``mmsphere.losses.objective``
the term registry and :class:`Objective`, ``mmsphere.losses.distributed`` the gradient-carrying
collectives the objective uses under several processes.
"""

from mmsphere.losses import functional
from mmsphere.losses.objective import TERMS, MixingDraws, Objective, ObjectiveOutput, Term, draw_mixing

__all__ = ["functional", "TERMS", "Term", "Objective", "ObjectiveOutput", "MixingDraws", "draw_mixing"]
