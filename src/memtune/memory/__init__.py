"""Memory measurement: exact per-category byte counts of live tensors during training."""

from .tracker import MemoryReport, MemoryTracker, measure_step

__all__ = ["MemoryReport", "MemoryTracker", "measure_step"]
