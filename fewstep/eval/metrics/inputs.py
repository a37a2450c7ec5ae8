"""One way to feed any fewstep metric: a metric declares in ``inputs`` what it compares the
generated images with ("reference" images, "prompts" or GenEval "metadata"), and
``update_metric`` calls its ``update`` accordingly."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric

INPUTS = ("reference", "prompts", "metadata")


def metric_inputs(metric: Metric, name: str = "metric") -> tuple[str, ...]:
    """The ``inputs`` a metric declares, or one clear error for a metric that declares none."""
    inputs = getattr(metric, "inputs", None)
    if not inputs or any(i not in INPUTS for i in inputs):
        raise TypeError(
            f"metrics.{name}: {type(metric).__name__} is not a fewstep metric (no `inputs` among "
            f"{INPUTS}); use the classes of fewstep.eval.metrics (FID, KID, CMMD, CLIPScore, "
            "HPSv2, DetectorGenEval)"
        )
    return tuple(inputs)


def update_metric(
    metric: Metric,
    images: Tensor,
    reference: Tensor | None = None,
    prompts: list[str] | None = None,
    metadata: list[Any] | None = None,
) -> bool:
    """Feed one batch of generated ``images`` (and what the metric compares them with) in
    [-1, 1]; returns False, feeding nothing, when that comparison is not available."""
    kind = metric_inputs(metric)[0]
    if kind == "reference":
        if reference is None:
            return False
        metric.update(reference, real=True)
        metric.update(images, real=False)
    elif kind == "prompts":
        if prompts is None:
            return False
        metric.update(images, list(prompts))
    else:
        if metadata is None:
            return False
        metric.update(images, list(metadata))
    return True


def needs_reference(metric: Metric) -> bool:
    """Whether the metric compares with reference images (a distribution distance)."""
    return metric_inputs(metric)[0] == "reference"


def results_of(name: str, value: Any) -> dict[str, float]:
    """A metric's ``compute()`` as flat floats: a tensor -> {name}; a dict -> {name/key};
    a (mean, std) pair (KID) -> {name, name_std}."""
    if isinstance(value, dict):
        return {f"{name}/{k}": float(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return {name: float(value[0]), f"{name}_std": float(value[1])}
    return {name: float(value)}
