"""Task adapters (:class:`tasks.base.Task`): each builds its model and data, runs the model, owns its metric."""

from ptq_bench.registry import Registry

TASKS: Registry[type] = Registry("task")

from tasks import classification, coco  # noqa: E402,F401  (registration)

__all__ = ["TASKS"]
