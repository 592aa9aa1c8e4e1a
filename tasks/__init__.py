"""Task adapters: each builds model and data for its task, runs a method, and owns the metric."""

from typing import Callable

from ptq_bench.registry import Registry

TASKS: Registry[Callable] = Registry("task")

from tasks import classification  # noqa: E402,F401  (registration)

__all__ = ["TASKS"]
