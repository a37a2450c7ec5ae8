"""A LoRA student's adapters as a folder diffusers and peft load onto the base transformer:
``pytorch_lora_weights.safetensors`` (diffusers' format: ``FluxPipeline.load_lora_weights(folder)``)
and ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's: ``PeftModel.from_pretrained(
transformer, folder)``, the way PixArt-Σ LoRAs load — its pipeline has no LoRA loader), with the
module names of diffusers' ``PixArtTransformer2DModel`` / ``FluxTransformer2DModel``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from fewstep.export.pixart_pipeline import _commit, check_out_dir
from fewstep.models.lora import diffusers_lora_state_dict, diffusers_target_modules, lora_layers

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
RECORD = "fewstep_lora.json"


def export_lora(
    net: nn.Module, out: str | Path, overwrite: bool = False, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``net``'s adapters (scale alpha/r folded into B, so alpha = r in the files) to
    ``out`` atomically; fused linears become their diffusers parts exactly (A shared, B split)."""
    out = check_out_dir(out, overwrite)
    if not lora_layers(net):
        raise ValueError("export_lora: the network has no LoRA adapters (set StudentModule lora).")
    state = diffusers_lora_state_dict(net)
    rank = int(next(iter(state.values())).shape[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    save_file({f"transformer.{k}": v for k, v in state.items()}, str(tmp / DIFFUSERS_FILE))
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(tmp / PEFT_FILE))
    targets = diffusers_target_modules(state)
    (tmp / "adapter_config.json").write_text(json.dumps(_peft_config(rank, targets), indent=2))
    record = {"format": "fewstep-lora/1", "rank": rank, "alpha": rank, "targets": targets}
    (tmp / RECORD).write_text(json.dumps({**record, **(metadata or {})}, indent=2, default=str))
    _commit(tmp, out, overwrite)
    return out


def _peft_config(rank: int, targets: list[str]) -> dict[str, Any]:
    """peft's adapter_config.json for adapters of ``rank`` on the named modules (alpha = r)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, bias="none")
    return json.loads(json.dumps(config.to_dict(), default=sorted))  # sets -> sorted lists
