"""PTQ methods; importing this package registers every module's method in :data:`METHODS`."""

import importlib
import pkgutil

from ptq_bench.methods.base import METHODS, BitWidth, Method, build_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "BitWidth", "Method", "build_method"]
