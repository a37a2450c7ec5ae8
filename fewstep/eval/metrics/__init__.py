"""Metrics as torchmetrics ``Metric``s (states synced across ranks) whose networks load from
local paths only: FID and KID over a pluggable feature network, CMMD, CLIPScore, HPSv2 and
GenEval with an open-vocabulary detector (docs/metrics.md lists the weights each expects)."""

from fewstep.eval.metrics.clip_score import CLIPScore
from fewstep.eval.metrics.cmmd import CMMD
from fewstep.eval.metrics.distribution import FID, KID
from fewstep.eval.metrics.features import ImageTower, InceptionFeatures, ShapesFeatures
from fewstep.eval.metrics.geneval_detector import DetectorGenEval
from fewstep.eval.metrics.hps import HPSv2
from fewstep.eval.metrics.inputs import update_metric
from fewstep.eval.metrics.weights import MissingWeightsError

__all__ = [
    "CLIPScore",
    "CMMD",
    "DetectorGenEval",
    "FID",
    "HPSv2",
    "ImageTower",
    "InceptionFeatures",
    "KID",
    "MissingWeightsError",
    "ShapesFeatures",
    "update_metric",
]
