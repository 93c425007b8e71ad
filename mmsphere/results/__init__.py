"""Results cards: every evaluation's ``results.json`` + ``results.md``, read back and compared side by side."""

from mmsphere.results.card import CARD_VERSION, card_markdown, load_card, make_card, model_precision, write_card
from mmsphere.results.compare import Comparison, compare_cards

__all__ = [
    "CARD_VERSION",
    "Comparison",
    "card_markdown",
    "compare_cards",
    "load_card",
    "make_card",
    "model_precision",
    "write_card",
]
