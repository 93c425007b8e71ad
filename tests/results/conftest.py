"""The tiny videos of the retrieval tests, shared."""

from tests.eval.conftest import media  # noqa: F401  (a fixture)
