"""Training the latent DiT teacher with a diffusion objective (PixArt-α §2.4; flow matching,
Lipman et al. 2023) and validating it with the GenEval-protocol shapes scorer. A FLUX.1 network
takes the batch's pooled text vector (``cond``); a guidance-embedded one (FLUX.1-dev) takes the
guidance scale as an input, one pass per sampling step."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import GuidanceEmbedded, guidance_passes
from fewstep.diffusion.losses import diffusion_loss
from fewstep.diffusion.parameterization import PredictionType
from fewstep.diffusion.samplers import DDIM, Sampler
from fewstep.diffusion.schedules import DiscreteDDPM, NoiseProcess, RectifiedFlow
from fewstep.diffusion.timesteps import LogitNormal, TimestepSampler, UniformDiscrete
from fewstep.eval.geneval import ShapesGenEval, specs_of
from fewstep.lightning.checkpoints import graft_weights
from fewstep.lightning.eval_metrics import Metrics, ValidationMetrics
from fewstep.lightning.latent_module import LatentDiffusionModule
from fewstep.lightning.sampling import generate
from fewstep.models.dit import DiT
from fewstep.models.flux import Flux
from fewstep.utils.seeding import fixed_noise, mix_seed


def default_optimizer(params: Iterable[Any]) -> Optimizer:
    """AdamW with lr 1e-4 and no weight decay (PixArt-α §3.1 uses AdamW, lr 2e-5 at scale)."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def default_timestep_sampler(process: NoiseProcess) -> TimestepSampler:
    """Uniform discrete t for DDPM (Ho et al. 2020), logit-normal for flows (SD3 §3.1)."""
    if isinstance(process, DiscreteDDPM):
        return UniformDiscrete(process.num_train_timesteps)
    if isinstance(process, RectifiedFlow):
        return LogitNormal()
    raise ValueError(
        f"TeacherModule: no default timestep_sampler for {type(process).__name__}; "
        "set model.init_args.timestep_sampler."
    )


def embeds_guidance(network: nn.Module) -> bool:
    """Whether the network takes the CFG scale as an input (guidance_embed: FLUX.1-dev, or a
    guidance-distilled DiT; Meng et al. 2023)."""
    config = getattr(network, "config", None)
    return callable(config) and bool(config().get("guidance_embed", False))


def network_denoiser(
    network: nn.Module, process: NoiseProcess, prediction: PredictionType, scale: float
) -> Denoiser:
    """``network`` as a denoiser; a guidance-embedded one is fed ``guidance=scale`` unless a call
    (e.g. CFG at another scale) gives its own."""
    learned_sigma = bool(getattr(network, "learn_sigma", False))
    if embeds_guidance(network):
        return GuidanceEmbedded(network, process, prediction, learned_sigma, scale=scale)
    return Denoiser(network, process, prediction, learned_sigma)


class TeacherModule(LatentDiffusionModule):
    """Trains ``network`` to predict ``prediction`` on ``process`` (automatic optimisation, so
    Trainer's gradient_clip_val applies); the EMA callback averages ``ema_target``. With learned
    sigma only the first C output channels are trained (no VLB term). Batches with ``cond`` (the
    pooled text vector) pass it to the network (Flux). A guidance-embedded network (FLUX.1-dev)
    is trained and sampled with ``guidance=guidance_scale`` (as diffusers' FLUX.1 fine-tuning
    scripts feed their --guidance_scale) and costs one pass per step, not two.

    ``init_weights`` (a teacher checkpoint) starts a fresh fit from its weights (its EMA average
    with ``init_weights_ema``), e.g. to fine-tune a trained teacher with a zero-initialised
    module added (``DiT.text_refiner_depth``); optimiser, schedule and EMA start anew."""

    def __init__(
        self,
        network: DiT | Flux,
        process: NoiseProcess,
        prediction: PredictionType = "epsilon",
        timestep_sampler: TimestepSampler | None = None,
        sampler: Sampler | None = None,
        guidance_scale: float = 4.5,
        vae_path: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        val_num_samples: int = 64,
        seed: int = 0,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        metrics: Metrics | None = None,
        init_weights: str | None = None,
        init_weights_ema: bool = True,
    ) -> None:
        super().__init__()
        objects = ["network", "process", "timestep_sampler", "sampler", "metrics"]
        self.save_hyperparameters(ignore=[*objects, "optimizer", "lr_scheduler"])
        if val_num_samples < 0:
            raise ValueError(f"TeacherModule: val_num_samples must be >= 0, got {val_num_samples}")
        self.network = network
        if init_weights:  # a fresh fit starts from them; a resume then restores its checkpoint
            new = graft_weights(network, init_weights, init_weights_ema)
            modules = sorted({name.split(".")[0] for name in new})
            rank_zero_info(
                f"init_weights: {init_weights}; {len(new)} new tensors start from their "
                f"initialisation ({', '.join(modules) or 'none'})"
            )
        self.process, self.prediction = process, prediction
        self.timestep_sampler = timestep_sampler or default_timestep_sampler(process)
        self.sampler = sampler if sampler is not None else DDIM(steps=20)  # validation sampler
        self.guidance_scale, self.vae_path = guidance_scale, vae_path
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.val_num_samples, self.seed = val_num_samples, seed
        self.val_geneval = ShapesGenEval()
        self.val_metrics = ValidationMetrics(metrics, ["teacher"]) if metrics else None  # vs data
        self._val_scored = 0

    @property
    def ema_target(self) -> nn.Module:
        """The network the EMA callback averages."""
        return self.network

    @property
    def learned_sigma(self) -> bool:
        """Whether the network also outputs variance channels."""
        return bool(getattr(self.network, "learn_sigma", False))

    @property
    def denoiser(self) -> Denoiser:
        """The network as a denoiser (built per call: strategies may rewrap ``network``); a
        guidance-embedded network at ``guidance_scale``."""
        return network_denoiser(self.network, self.process, self.prediction, self.guidance_scale)

    def configure_model(self) -> None:
        """With ``compile``, compile the network's forward in place (``nn.Module.compile``: the
        parameter names, hence checkpoints and EMA, stay those of the eager network)."""
        if self.hparams.compile and self.network._compiled_call_impl is None:
            self.network.compile(**(self.hparams.compile_kwargs or {}))

    def sample_latents(
        self,
        text: Tensor,
        text_mask: Tensor,
        noise: Tensor,
        guidance_scale: float | None = None,
        sampler: Sampler | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """Guided samples from ``noise`` (defaults: the configured sampler and scale); ``cond``:
        the pooled text vectors [B, Dv] of a network that takes them."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        denoiser = self.denoiser
        null = self.null_text() if guidance_passes(denoiser, scale) == 2 else None
        sampler = sampler or self.sampler
        return generate(denoiser, sampler, text, text_mask, noise, scale, null, cond=cond)

    def _loss(self, batch: dict[str, Any], generator: torch.Generator) -> Tensor:
        """Diffusion loss with t and noise drawn from ``generator``."""
        x0 = batch["latents"]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        t = self.timestep_sampler(x0.shape[0], device=x0.device, generator=generator)
        cond = {"text": batch["text"], "text_mask": batch["text_mask"].bool()}
        if "cond" in batch:
            cond["cond"] = batch["cond"]  # the pooled text vector [B, Dv] (Flux)
        return diffusion_loss(self.denoiser, x0, noise.to(x0.dtype), t, **cond)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One step; noise and t come from (seed, global_step, rank), so resume is exact."""
        loss = self._loss(batch, self.step_generator(batch_idx, batch["latents"].device))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        """Reset the per-epoch GenEval sample budget."""
        self._val_scored = 0
        self.val_geneval.reset()
        if self.val_metrics is not None:
            self.val_metrics.to(self.device).reset()

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Loss at fixed (t, noise) per batch, and GenEval scores of guided samples."""
        device = batch["latents"].device
        generator = torch.Generator(device=device).manual_seed(
            mix_seed(self.seed, 1 << 40, dataloader_idx, batch_idx)
        )
        loss = self._loss(batch, generator)
        self.log("val/loss", loss, batch_size=batch["latents"].shape[0], sync_dist=True)
        self._score(batch)

    def _score(self, batch: dict[str, Any]) -> None:
        """Sample and decode the batch's rows up to ``val_num_samples`` (only the shapes-world
        rows without ``metrics``): GenEval-score the shapes rows, feed ``metrics`` all of them."""
        budget = self.val_num_samples - self._val_scored
        specs = specs_of(batch["metadata"])
        rows = [i for i, s in enumerate(specs) if s is not None or self.val_metrics is not None]
        rows = rows[: max(budget, 0)]
        if not rows or self.vae_path is None:
            return
        x0 = batch["latents"]
        noise = fixed_noise(x0.shape[1:], batch["index"][rows].tolist(), self.seed, x0.device)
        cond = batch["cond"][rows] if "cond" in batch else None
        text, mask = batch["text"][rows], batch["text_mask"][rows]
        latents = self.sample_latents(text, mask, noise, cond=cond)
        images = self.decode(latents)
        shapes = [j for j, i in enumerate(rows) if specs[i] is not None]
        if shapes:
            self.val_geneval.update(images[shapes], [specs[rows[j]] for j in shapes])
        if self.val_metrics is not None:
            captions, meta = (
                [batch["caption"][i] for i in rows],
                [batch["metadata"][i] for i in rows],
            )
            self.val_metrics.update("teacher", images, self.decode(x0[rows]), captions, meta)
        self._val_scored += len(rows)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/geneval/<category>``, ``val/geneval/overall`` and ``val/nfe`` (network
        evaluations per image, a CFG step counting two as in the student's evaluation, one for a
        guidance-embedded network)."""
        if self.vae_path is None or self.val_num_samples == 0:
            return
        if self.val_metrics is not None:  # synced by torchmetrics: the same on every rank
            logged = {f"val/{k}": v for k, v in self.val_metrics.compute("teacher").items()}
            self.log_dict(logged, sync_dist=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            scores = self.val_geneval.compute()
        if torch.isnan(scores["overall"]):
            return  # no shapes-world samples in this validation set
        scores = {f"val/geneval/{k}": v.float() for k, v in scores.items()}  # synced already
        self.log_dict(scores, sync_dist=True)
        self.log("val/nfe", float(self.nfe), sync_dist=True)
        self.val_geneval.reset()

    @property
    def nfe(self) -> int:
        """Network passes per image of the validation sampler: a CFG step is a conditional and an
        unconditional pass, a guidance-embedded network's step one."""
        return self.sampler.nfe * guidance_passes(self.denoiser, self.guidance_scale)

    def configure_optimizers(self) -> Any:
        """The CLI-built optimiser over the trainable network, plus a per-step scheduler."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = self.optimizer(params)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
