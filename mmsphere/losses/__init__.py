"""Objective terms on the unit hypersphere: pure functions, the term registry and the composed objective.

``mmsphere.losses.functional`` holds the losses as functions (each its term on one whole batch),
``mmsphere.losses.terms`` the term registry (built-in terms and :func:`register_term` for a user's
own), ``mmsphere.losses.config`` the ``loss`` config section, ``mmsphere.losses.reducers``
the weighted reduction of per-sample losses, ``mmsphere.losses.objective`` the :class:`Objective`
that composes them, and ``mmsphere.losses.distributed`` the gradient-carrying collectives.
"""

from mmsphere.losses import functional
from mmsphere.losses import margins  # registers the margin family's terms
from mmsphere.losses.objective import Objective, ObjectiveOutput, ObjectiveTerms
from mmsphere.losses.reducers import reduce_weighted
from mmsphere.losses.terms import TERMS, Term, TermContext, TermOptions, register_term

__all__ = ["functional", "TERMS", "Term", "TermOptions", "TermContext", "register_term", "Objective",
           "ObjectiveOutput", "ObjectiveTerms", "reduce_weighted"]
