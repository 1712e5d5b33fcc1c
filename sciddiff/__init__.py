"""sciddiff: one diffusion and flow-matching engine for scientific generative modelling.

Subpackages: ``core`` (states, constraints, processes, parameterizations, losses), ``samplers``,
``likelihood``, ``testing`` (exact-score testbeds), ``training`` (needs pytorch-lightning).
Nothing is imported here, so ``import sciddiff`` stays light.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sciddiff")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
