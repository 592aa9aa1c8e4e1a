"""PTQ methods; importing this package registers all of them in :data:`METHODS`."""

from ptq_bench.methods import fp, minmax  # noqa: F401  (registration)
from ptq_bench.methods.base import METHODS, BitWidth, Method, build_method

__all__ = ["METHODS", "BitWidth", "Method", "build_method"]
