"""CFG evaluation callback: fixed prompts and fixed noise sampled at several guidance scales and
step counts (Ho & Salimans 2022), logged as captioned image grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor

from fewstep.eval.geneval import tensor_to_hwc
from fewstep.eval.grid import captioned_grid
from fewstep.lightning.image_log import log_dir, log_image
from fewstep.lightning.sampling import call_wrapped
from fewstep.models.text_encoder import pad_rows
from fewstep.utils.artifacts import CFG_FOLDER, cfg_grid_name
from fewstep.utils.seeding import fixed_noise


class Row(NamedTuple):
    """One prompt of the grids: text [L, D], mask [L] bool, caption, pooled vector [Dv] or None."""

    text: Tensor
    mask: Tensor
    caption: str
    cond: Tensor | None = None


class CFGEvalCallback(pl.Callback):
    """Every ``every_n_steps`` (checked at validation end, so EMA weights are in place) samples
    the prompts with the same noise for every (scale, steps) and logs one grid per pair to
    TensorBoard (``cfg/scale_<s>/steps_<n>``) and, with ``save_png``, to ``<log_dir>/cfg_eval``.

    The module must provide ``sample_latents(text, mask, noise, scale, sampler, cond)``,
    ``sampler`` (a ``Sampler``: ``with_steps(n)``), ``decode(latents)`` and ``network`` (as
    TeacherModule does).
    Without ``prompts`` the first ``num_prompts`` validation captions are used, with their pooled
    text vectors (``cond``, for FLUX.1 networks) when the batches carry them; custom prompts are
    encoded with the text encoder at ``text_encoder_path`` (the one the cache was built with).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        num_prompts: int = 8,
        text_encoder_path: str | None = None,
        guidance_scales: list[float] | None = None,
        steps: list[int] | None = None,
        seed: int = 0,
        save_png: bool = True,
        cell: int = 96,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"CFGEvalCallback: every_n_steps must be >= 1, got {every_n_steps}")
        if prompts is not None and text_encoder_path is None:
            raise ValueError(
                "CFGEvalCallback: custom prompts need text_encoder_path (the text encoder the "
                "latent cache was built with) to be encoded; or leave prompts unset to use the "
                "validation captions."
            )
        self.every_n_steps, self.prompts, self.num_prompts = every_n_steps, prompts, num_prompts
        self.text_encoder_path = text_encoder_path
        self.guidance_scales = list(guidance_scales or [1.0, 3.0, 6.0])
        self.steps = list(steps or [4, 20])
        self.seed, self.save_png, self.cell = seed, save_png, cell
        self.last_step = 0  # global step of the last grids (saved in checkpoints)
        self._rows: list[Row] = []
        self._latent_shape: tuple[int, ...] | None = None

    def _due(self, trainer: pl.Trainer) -> bool:
        """Whether this validation epoch should produce grids."""
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True  # `fewstep validate`: always
        n = self.every_n_steps
        return trainer.global_step // n > self.last_step // n  # crossed a multiple of n

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Encode custom prompts once (checked against the cache's text encoder if it can)."""
        if self.prompts is None or self._rows:
            return
        from fewstep.models.text_encoder import TextEncoder

        encoder = TextEncoder(self.text_encoder_path)
        check = getattr(trainer.datamodule, "check_encoders", None)
        if check is not None:
            check(text=encoder.fingerprint())
        text, mask = encoder(list(self.prompts))
        rows = zip(text, mask, self.prompts, strict=True)
        self._rows = [Row(t[m], m[m], c) for t, m, c in rows]

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Collect the first validation captions (and the latent shape) as default prompts."""
        if not isinstance(batch, dict) or "latents" not in batch:
            return
        self._latent_shape = tuple(batch["latents"].shape[1:])
        need = self.num_prompts - len(self._rows)
        if self.prompts is not None or need <= 0:
            return
        texts, masks = batch["text"][:need], batch["text_mask"][:need]
        conds = batch["cond"][:need] if "cond" in batch else [None] * len(texts)
        rows = zip(texts, masks, batch["caption"][:need], conds, strict=True)
        for text, mask, caption, cond in rows:
            pooled = None if cond is None else cond.detach().cpu()
            self._rows.append(Row(text.detach().cpu(), mask.detach().cpu().bool(), caption, pooled))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sample and log the grids when due (all ranks sample: FSDP needs every rank)."""
        if not self._rows or not self._due(trainer):
            return
        self.last_step = trainer.global_step
        with torch.no_grad():
            grids = self.grids(trainer, pl_module)
        if grids:
            folder = log_dir(trainer) / CFG_FOLDER  # collective
            self._write(trainer, grids, folder)

    def grids(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[tuple[float, int], Image.Image]:
        """One captioned grid per (guidance scale, steps), all from the same noise."""
        device = pl_module.device
        text, mask = pad_rows([r.text for r in self._rows], [r.mask for r in self._rows])
        text, mask = text.to(device), mask.to(device)
        noise = fixed_noise(self._shape(pl_module), range(len(self._rows)), self.seed, device)
        captions = [r.caption for r in self._rows]
        pooled = [r.cond for r in self._rows]
        cond = None if any(c is None for c in pooled) else torch.stack(pooled).to(device)
        out = {}
        for steps in self.steps:
            sampler = pl_module.sampler.with_steps(steps)
            for scale in self.guidance_scales:
                args = (text, mask, noise, scale, sampler, cond)
                latents = call_wrapped(trainer, pl_module, "sample_latents", *args)
                images = pl_module.decode(latents)
                if images is None:
                    return {}  # no VAE to decode with
                tiles = [tensor_to_hwc(image) for image in images]
                out[(scale, steps)] = captioned_grid(tiles, captions, cols=4, cell=self.cell)
        return out

    def _shape(self, pl_module: pl.LightningModule) -> tuple[int, ...]:
        """Latent shape (C, h, w): from the validation batches, else the network's sample size."""
        if self._latent_shape is not None:
            return self._latent_shape
        net = pl_module.network
        side = net.base_size * net.patch_size
        return (net.in_channels, side, side)

    @rank_zero_only
    def _write(
        self, trainer: pl.Trainer, grids: dict[tuple[float, int], Image.Image], folder: Path
    ) -> None:
        """Log the grids (TensorBoard or any image-taking logger) and save PNGs into ``folder``."""
        step = trainer.global_step
        for (scale, steps), grid in grids.items():
            png = folder / cfg_grid_name(step, scale, steps) if self.save_png else None
            log_image(trainer, f"cfg/scale_{scale:g}/steps_{steps}", grid, png)

    def state_dict(self) -> dict[str, Any]:
        """The step of the last grids, so a resumed run does not redraw them."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``last_step``."""
        self.last_step = int(state_dict.get("last_step", 0))
