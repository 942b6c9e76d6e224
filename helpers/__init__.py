"""Helpers for the FP8-RL / M2DQN experiment notebooks.

Import ``helpers`` before torch and triton:

* ``helpers.core.runtime`` sets ``TRITON_INTERPRET=1`` on machines without a GPU, which must happen before :mod:`triton`
  is imported anywhere;
* ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (read by torch's OpenMP runtime when torch loads). With the
  default (active) policy, torch's idle OpenMP workers spin on the cores after every parallel op and starve the
  threads of the compiled FP8 re-quantizer (:mod:`helpers.fp8.native`): re-quantizing 1 GB of bf16 weights took
  4.3x a plain copy instead of 2.8x on this 2-core machine. Set the variable yourself to keep another policy.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from helpers.core import runtime  # noqa: E402,F401  (must stay the first helpers import)

__version__ = "0.1.0"
