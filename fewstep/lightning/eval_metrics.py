"""Metrics of validation from the YAML (``metrics:`` a dict of fewstep metrics or a
MetricCollection): one copy per evaluated sampler and reference, the copies sharing the frozen
networks, kept out of the LightningModule's children (never saved, optimised or EMA'd)."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

from torch import Tensor
from torchmetrics import Metric, MetricCollection

from fewstep.eval.metrics.inputs import metric_inputs, needs_reference, results_of, update_metric

Metrics = MetricCollection | dict[str, Metric]


def shared_copy(metric: Metric) -> Metric:
    """A copy of ``metric`` with its own (empty) states and the same networks."""
    networks = {id(m): m for m in metric.modules() if m is not metric}
    twin = copy.deepcopy(metric, networks)
    twin.reset()
    return twin


class ValidationMetrics:
    """Per key ("teacher", "student_2", "student_2|teacher"...) a copy of each metric; keys
    ending in ``|teacher`` hold only the reference metrics (FID, KID, CMMD)."""

    def __init__(self, metrics: Metrics, keys: list[str]) -> None:
        template = dict(metrics.items())
        for name, metric in template.items():
            metric_inputs(metric, name)  # one clear error for a metric fewstep cannot feed
        self.copies = {
            key: {
                name: shared_copy(m)
                for name, m in template.items()
                if not key.endswith("|teacher") or needs_reference(m)
            }
            for key in keys
        }

    def to(self, device: Any) -> ValidationMetrics:
        """Move every copy (and the shared networks) to ``device``."""
        for metrics in self.copies.values():
            for metric in metrics.values():
                metric.to(device)
        return self

    def reset(self) -> None:
        """Empty every state."""
        for metrics in self.copies.values():
            for metric in metrics.values():
                metric.reset()

    def update(
        self,
        key: str,
        images: Tensor | None,
        reference: Tensor | None = None,
        prompts: list[str] | None = None,
        metadata: list[Any] | None = None,
    ) -> None:
        """Feed one batch of ``key``'s images (in [-1, 1]) to its metrics."""
        if images is None or key not in self.copies:
            return
        for metric in self.copies[key].values():
            update_metric(metric, images, reference, prompts, metadata)

    def compute(self, key: str) -> dict[str, float]:
        """``key``'s results as flat floats (synced across ranks); a metric without enough
        samples yet (e.g. the sanity check) is left out with a warning."""
        out: dict[str, float] = {}
        for name, metric in self.copies.get(key, {}).items():
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                    values = results_of(name, metric.compute())
            except (RuntimeError, ValueError) as err:
                warnings.warn(f"validation metric {name} ({key}) not computed: {err}", stacklevel=2)
                continue
            out.update({k: v for k, v in values.items() if not math.isnan(v)})
        return out
