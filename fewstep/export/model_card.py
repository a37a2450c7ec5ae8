"""The model card (README.md) of an exported pipeline folder: what it is, the exact diffusers
call that reproduces fewstep's sampling, the teacher it was distilled from and its scores."""

from __future__ import annotations

import json
from typing import Any

FRONT_MATTER = """---
library_name: diffusers
pipeline_tag: text-to-image
tags: [fewstep, {family}, text-to-image{extra}]
---
"""


def _call_lines(record: dict[str, Any]) -> list[str]:
    """The pipeline call per step count (students) or the single call (teachers)."""
    calls = record.get("pipeline_calls") or {"default": record.get("pipeline_call", {})}
    lines = ["| steps | pipeline call (keyword arguments) |", "|---|---|"]
    for steps, call in calls.items():
        lines.append(f"| {steps} | `{json.dumps(call, default=str)}` |")
    return lines


def model_card(record: dict[str, Any], eval_table: str | None = None) -> str:
    """README.md text for an export whose ``fewstep_export.json`` record is ``record``."""
    student = record.get("kind") == "student"
    what = "distilled student" if student else "diffusion model (teacher)"
    teacher = record.get("teacher") or {}
    call = record.get("pipeline_call", {})
    module, _, name = record.get("pipeline_class", "diffusers.PixArtSigmaPipeline").rpartition(".")
    module = "diffusers" if module.startswith("diffusers") else module
    lines = [
        FRONT_MATTER.format(
            family=record.get("family", "pixart-sigma"), extra=", distillation" if student else ""
        ),
        f"# A {what} exported by fewstep",
        "",
        f"- process: `{json.dumps(record.get('process'), default=str)}`, prediction: "
        f"`{record.get('prediction')}`",
        f"- fewstep sampler: `{record.get('sampler')}`",
    ]
    if student:
        lines += [
            f"- method: `{record.get('method')}`",
            f"- teacher: `{teacher.get('ckpt')}` (config `{teacher.get('config')}`, weights "
            f"sha256 `{teacher.get('sha256')}`)",
        ]
    text = (record.get("text_encoder") or {}).get("path")
    lines += [
        f"- text encoder: `{text}`" if text else "- text encoder: none (pass `prompt_embeds`)",
        "",
        "## Use",
        "",
        "```python",
        f"from {module} import {name}",
        "",
        f'pipe = {name}.from_pretrained("<this folder>"{record.get("load_kwargs", "")})',
        f"call = {json.dumps(call, default=str)}",
        f"images = pipe({record.get('prompt_call', 'prompt=[...], clean_caption=False')}, "
        "**call).images",
        "```",
        "",
        "These keyword arguments reproduce fewstep's samples (tested to 1e-4 on the latents):",
        "",
        *_call_lines(record),
    ]
    if eval_table:
        lines += ["", "## Evaluation (fewstep validation)", "", eval_table.strip()]
    return "\n".join(lines) + "\n"
