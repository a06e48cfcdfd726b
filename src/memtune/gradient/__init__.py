"""Update rules (the gradient axis). Importing this package registers every rule."""

from . import backprop, mezo  # noqa: F401  (registration)
from .base import OPTIMIZERS, StepStats, UpdateRule, schedule_factor

__all__ = ["OPTIMIZERS", "StepStats", "UpdateRule", "schedule_factor"]
