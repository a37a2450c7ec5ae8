"""GenEval with an open-vocabulary detector (Ghosh et al. 2023, with OWLv2 / OWL-ViT of
transformers in place of Mask2Former; Minderer et al. 2022, 2023): boxes for GenEval's object
names, colours of the boxes by CLIP zero-shot classification as GenEval does, and GenEval's
rules (geneval_rules.py); per-task accuracy and their mean, summed across ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from fewstep.eval.metrics.clip_score import load_clip
from fewstep.eval.metrics.features import to_uint8
from fewstep.eval.metrics.geneval_prompts import CLASSNAMES, COLORS, TAGS
from fewstep.eval.metrics.geneval_rules import (
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    NMS_THRESHOLD,
    THRESHOLD,
    BoxDetection,
    judge,
    select_detections,
)
from fewstep.eval.metrics.weights import HF_PREPROCESSOR, HF_WEIGHTS, require_files

DETECTOR_FILES = ("config.json", HF_WEIGHTS, HF_PREPROCESSOR, "tokenizer_config.json")
COLOR_TEMPLATES = (
    "a photo of a {c} {name}",
    "a photo of a {c}-colored {name}",
    "a photo of a {c} object",
)


class OpenVocabDetector(nn.Module):
    """OWLv2 / OWL-ViT of an HF folder, queried with 'a photo of a <class>' for every class;
    each box takes its best query (label) and that query's sigmoid score."""

    def __init__(self, path: str, classnames: tuple[str, ...] = CLASSNAMES) -> None:
        super().__init__()
        from transformers import (
            AutoConfig,
            AutoProcessor,
            Owlv2ForObjectDetection,
            OwlViTForObjectDetection,
        )

        folder = require_files(path, DETECTOR_FILES, "GenEval detector (OWLv2 / OWL-ViT folder)")
        kind = AutoConfig.from_pretrained(folder).model_type
        classes = {"owlv2": Owlv2ForObjectDetection, "owlvit": OwlViTForObjectDetection}
        if kind not in classes:
            raise ValueError(
                f"GenEval detector: {folder} holds a {kind!r} model; use OWLv2/OWL-ViT"
            )
        self.model = classes[kind].from_pretrained(folder).eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(folder)
        self.padded_square = kind == "owlv2"  # OWLv2 pads to a square; OWL-ViT stretches
        self.classnames = tuple(classnames)
        queries = [f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}" for c in classnames]
        length = self.model.config.text_config.max_position_embeddings  # 16 for OWL
        tokens = self.processor.tokenizer(
            queries, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        self.tokens = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    @torch.no_grad()
    def forward(self, images: list[np.ndarray], min_score: float) -> list[list[BoxDetection]]:
        """Detections scoring above ``min_score`` per HxWx3 uint8 image."""
        device = next(self.model.parameters()).device
        pixels = self.processor.image_processor(images=images, return_tensors="pt")
        queries = {k: v.repeat(len(images), 1).to(device) for k, v in self.tokens.items()}
        out = self.model(pixel_values=pixels["pixel_values"].to(device), **queries)
        scores, labels = out.logits.sigmoid().max(dim=-1)  # [B, P]
        return [
            self._boxes(scores[b], labels[b], out.pred_boxes[b], image.shape[:2], min_score)
            for b, image in enumerate(images)
        ]

    def _boxes(
        self, scores: Tensor, labels: Tensor, boxes: Tensor, hw: tuple[int, int], min_score: float
    ) -> list[BoxDetection]:
        """(cx, cy, w, h) in [0, 1] of the model's square input -> pixel (x0, y0, x1, y1)."""
        h, w = hw
        scale = (max(h, w), max(h, w)) if self.padded_square else (w, h)
        cx, cy, bw, bh = boxes.float().cpu().unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)  # [P, 4]
        xyxy = xyxy * torch.tensor([scale[0], scale[1], scale[0], scale[1]])
        keep = (scores > min_score).nonzero().flatten().tolist()
        return [
            BoxDetection(self.classnames[int(labels[i])], float(scores[i]), tuple(xyxy[i].tolist()))
            for i in keep
        ]


class ClipColorClassifier(nn.Module):
    """GenEval's colour check: CLIP zero-shot over COLORS with its three templates (embeddings
    normalised, averaged over templates, renormalised, as clip_benchmark), on box crops."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.model, self.processor = load_clip(path, "GenEval colour classifier (CLIP folder)")
        self._classifiers: dict[str, Tensor] = {}

    @torch.no_grad()
    def classifier(self, name: str) -> Tensor:
        """Class weights [D, len(COLORS)] for objects called ``name``."""
        if name not in self._classifiers:
            device = next(self.model.parameters()).device
            texts = [t.format(c=c, name=name) for c in COLORS for t in COLOR_TEMPLATES]
            tokens = self.processor(text=texts, return_tensors="pt", padding=True).to(device)
            emb = F.normalize(self.model.get_text_features(**tokens), dim=-1)
            emb = emb.reshape(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)  # [C, T, D] -> [C, D]
            self._classifiers[name] = F.normalize(emb, dim=-1).T
        return self._classifiers[name].to(next(self.model.parameters()).device)

    @torch.no_grad()
    def forward(self, image: np.ndarray, boxes: list[BoxDetection], name: str) -> list[str]:
        """The colour of each box of ``image`` (HxWx3 uint8)."""
        h, w = image.shape[:2]
        crops = []
        for det in boxes:  # PIL's crop rounding; boxes clipped to the image
            x0, y0, x1, y1 = (int(round(v)) for v in det.box)
            x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
            crops.append(image[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)])
        device = next(self.model.parameters()).device
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(device)
        emb = F.normalize(self.model.get_image_features(pixels), dim=-1)
        return [COLORS[i] for i in (emb @ self.classifier(name)).argmax(-1).tolist()]


class DetectorGenEval(Metric):
    """GenEval accuracy per task and overall (their mean, as GenEval's summary) of images in
    [-1, 1] against GenEval metadata dicts (``include``/``exclude``/``tag``; others skipped)."""

    inputs = ("metadata",)
    full_state_update = False

    def __init__(
        self,
        detector_path: str,
        clip_path: str,
        threshold: float = THRESHOLD,
        counting_threshold: float = COUNTING_THRESHOLD,
        max_objects: int = MAX_OBJECTS,
        nms_threshold: float = NMS_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.detector = OpenVocabDetector(detector_path)
        self.colors = ClipColorClassifier(clip_path)
        self.selection = {
            "threshold": threshold,
            "counting_threshold": counting_threshold,
            "max_objects": max_objects,
            "nms_threshold": nms_threshold,
        }
        n = len(TAGS)
        self.add_state("correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, metadata: list[dict[str, Any]]) -> None:
        """Judge each image whose metadata carries GenEval requirements."""
        rows = [i for i, m in enumerate(metadata) if isinstance(m, dict) and "include" in m]
        if not rows:
            return
        pictures = list(to_uint8(images[rows]).permute(0, 2, 3, 1).cpu().numpy())  # [B, H, W, 3]
        low = min(self.selection["threshold"], self.selection["counting_threshold"])
        for picture, dets, i in zip(pictures, self.detector(pictures, low), rows, strict=True):
            ok = self.judge_one(picture, dets, metadata[i])
            k = TAGS.index(metadata[i]["tag"])
            self.total[k] += 1
            self.correct[k] += int(ok)

    def judge_one(self, image: np.ndarray, dets: list[BoxDetection], meta: dict) -> bool:
        """GenEval's verdict for one image's raw detections."""
        detected = select_detections(dets, meta.get("tag", ""), **self.selection)
        return judge(detected, meta, lambda boxes, name: self.colors(image, boxes, name))[0]

    def compute(self) -> dict[str, Tensor]:
        """Accuracy per task seen and ``overall``, their mean."""
        seen = self.total > 0
        acc = self.correct.double() / self.total.clamp(min=1)
        out = {tag: acc[k].float() for k, tag in enumerate(TAGS) if seen[k]}
        out["overall"] = acc[seen].mean().float() if seen.any() else torch.tensor(float("nan"))
        return out
