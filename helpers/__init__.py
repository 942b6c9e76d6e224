"""Helpers for the FP8-RL / M2DQN experiment notebooks.

``helpers.runtime`` is imported first: it sets ``TRITON_INTERPRET=1`` on machines without a GPU, which must
happen before :mod:`triton` is imported anywhere.
"""

from helpers import runtime  # noqa: F401  (must stay the first import)

__version__ = "0.1.0"
