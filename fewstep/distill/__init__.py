"""Distillation methods: one file per method, each an object the StudentModule calls."""

from fewstep.distill.base import DistillationMethod, DistillBatch, Models

__all__ = ["DistillBatch", "DistillationMethod", "Models"]
