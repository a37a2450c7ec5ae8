"""Training the VAE: reconstruction + KL (Kingma & Welling 2014), optional perceptual and
PatchGAN hinge terms, as in the LDM autoencoder (Rombach et al. 2022, Sec. 3 and App. G)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics.image import PeakSignalNoiseRatio
from torchvision.utils import make_grid

from fewstep.eval.geneval import ShapesGenEval, specs_of
from fewstep.models.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from fewstep.models.perceptual import FeaturePerceptualLoss
from fewstep.models.vae import VAE, gaussian_kl
from fewstep.utils.seeding import mix_seed


def default_optimizer(params: Iterable[Any]) -> Optimizer:
    """AdamW with lr 1e-3."""
    return torch.optim.AdamW(params, lr=1e-3)


class VAEModule(pl.LightningModule):
    """Trains a ``VAE`` with manual optimisation (generator step, then discriminator step once
    ``disc_start_step`` generator steps are done); measures the latent scale at fit end."""

    def __init__(
        self,
        vae: VAE,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        perceptual: FeaturePerceptualLoss | None = None,
        perceptual_weight: float = 0.0,
        discriminator: PatchDiscriminator | None = None,
        disc_weight: float = 0.1,
        disc_start_step: int = 0,
        optimizer: OptimizerCallable = default_optimizer,
        disc_optimizer: OptimizerCallable | None = None,
        grad_clip: float = 1.0,
        measure_scale_batches: int = 20,
        measure_shift: bool = True,
        sample_grid_size: int = 8,
        export_dir: str | None = None,
        sample_posterior: bool = True,
        train_crop: int | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                "vae",
                "perceptual",
                "discriminator",
                "optimizer",
                "disc_optimizer",
                "lr_scheduler",
            ]
        )
        self.automatic_optimization = False
        self.vae, self.perceptual, self.discriminator = vae, perceptual, discriminator
        self.optimizer, self.disc_optimizer = optimizer, disc_optimizer or optimizer
        self.lr_scheduler = lr_scheduler  # stepped once per generator step
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)  # images in [-1, 1]
        self.val_geneval = ShapesGenEval()  # semantic fidelity of reconstructions
        self.generator_steps = 0  # own counter: Lightning's global_step counts both optimisers

    @property
    def ema_target(self) -> VAE:
        """The network the EMA callback averages."""
        return self.vae

    def configure_optimizers(self) -> Any:
        """Generator (VAE) optimiser, plus the discriminator's when there is one; the optional
        scheduler drives the generator's learning rate per generator step."""
        optimizers = [self.optimizer(self.vae.parameters())]
        if self.discriminator is not None:
            optimizers.append(self.disc_optimizer(self.discriminator.parameters()))
        if self.lr_scheduler is None:
            return optimizers
        return optimizers, [{"scheduler": self.lr_scheduler(optimizers[0]), "interval": "step"}]

    def _losses(
        self, images: Tensor, recon: Tensor, mean: Tensor, std: Tensor
    ) -> dict[str, Tensor]:
        """Unweighted reconstruction, KL and perceptual terms."""
        losses = {
            "l1": F.l1_loss(recon, images),
            "l2": F.mse_loss(recon, images),
            "kl": gaussian_kl(mean, std).mean(),
        }
        if self.perceptual is not None and self.hparams.perceptual_weight > 0:
            losses["perceptual"] = self.perceptual(recon, images)
        return losses

    def _generator_loss(self, losses: dict[str, Tensor], pixels: int) -> Tensor:
        """Weighted sum; KL is divided by pixels per image, so kl_weight matches LDM's sum-based
        convention (Rombach et al. 2022) while the reconstruction terms are per-pixel means."""
        hp = self.hparams
        total = hp.l1_weight * losses["l1"] + hp.l2_weight * losses["l2"]
        total = total + hp.kl_weight * losses["kl"] / pixels
        if "perceptual" in losses:
            total = total + hp.perceptual_weight * losses["perceptual"]
        if "g" in losses:
            total = total + hp.disc_weight * losses["g"]
        return total

    def _step(self, optimizer: Any, loss: Tensor) -> None:
        """Backward, clip and step one optimiser."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.hparams.grad_clip > 0:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm"
            )
        optimizer.step()

    def _random_crop(self, images: Tensor) -> Tensor:
        """One random ``train_crop`` window per batch: a convolutional VAE learns the same
        per-pixel mapping at a fraction of the cost (seeded by the step, so resume is exact)."""
        size = self.hparams.train_crop
        if size is None or size >= min(images.shape[-2:]):
            return images
        generator = torch.Generator().manual_seed(self.generator_steps)
        y = int(torch.randint(0, images.shape[-2] - size + 1, (1,), generator=generator))
        x = int(torch.randint(0, images.shape[-1] - size + 1, (1,), generator=generator))
        return images[..., y : y + size, x : x + size]  # B,3,size,size

    def _posterior_noise(self, std: Tensor) -> Tensor:
        """N(0, I) like ``std``, seeded by the generator step (so resume is exact)."""
        generator = torch.Generator(std.device).manual_seed(mix_seed(self.generator_steps, 1))
        return torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Generator step on the reparameterised sample, then (if active) a discriminator step."""
        images = self._random_crop(batch["image"])
        optimizers = self.optimizers()
        opt_g, *rest = optimizers if isinstance(optimizers, list) else [optimizers]
        opt_d = rest[0] if rest else None
        disc_on = opt_d is not None and self.generator_steps >= self.hparams.disc_start_step

        self.toggle_optimizer(opt_g)
        mean, std = self.vae.encode_moments(images)
        z = mean + std * self._posterior_noise(std) if self.hparams.sample_posterior else mean
        recon = self.vae.decode_raw(z)
        losses = self._losses(images, recon, mean, std)
        if disc_on:
            losses["g"] = hinge_g_loss(self.discriminator(recon))
        losses["loss"] = self._generator_loss(losses, images[0].numel())
        self._step(opt_g, losses["loss"])
        self.untoggle_optimizer(opt_g)

        if disc_on:
            self.toggle_optimizer(opt_d)
            losses["d"] = hinge_d_loss(
                self.discriminator(images), self.discriminator(recon.detach())
            )
            self._step(opt_d, losses["d"])
            self.untoggle_optimizer(opt_d)
        self.generator_steps += 1
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # manual optimisation: Lightning does not step it
        total = losses.pop("loss").detach()
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=len(images))
        self.log("train/loss", total, prog_bar=True, batch_size=len(images))
        return total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Losses and PSNR of the posterior-mean reconstruction; an image grid on batch 0."""
        images = batch["image"]
        mean, std = self.vae.encode_moments(images)
        recon = self.vae.decode_raw(mean)
        losses = self._losses(images, recon, mean, std)
        if self.discriminator is not None:
            fake_logits = self.discriminator(recon)
            losses["g"] = hinge_g_loss(fake_logits)
            losses["d"] = hinge_d_loss(self.discriminator(images), fake_logits)
        losses["loss"] = self._generator_loss(losses, images[0].numel())
        self.val_psnr.update(recon.clamp(-1, 1), images)
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, batch_size=images.shape[0], sync_dist=True
        )
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        self._score(recon, batch.get("metadata"))
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self._log_grid(images, recon)

    def _score(self, recon: Tensor, metadata: list[Any] | None) -> None:
        """Feed shapes-world reconstructions to the GenEval-protocol scorer (issue bar: >= 95%)."""
        specs = specs_of(metadata or [])
        rows = [i for i, spec in enumerate(specs) if spec is not None]
        if rows:
            self.val_geneval.update(recon[rows].clamp(-1, 1), [specs[i] for i in rows])

    def on_validation_epoch_end(self) -> None:
        """Log ``val/geneval/<category>`` and ``val/geneval/overall`` when shapes were scored."""
        if not bool(self.val_geneval.total.sum() > 0):
            return
        scores = self.val_geneval.compute()
        self.log_dict({f"val/geneval/{k}": v.float() for k, v in scores.items()}, sync_dist=True)
        self.val_geneval.reset()

    def _log_grid(self, images: Tensor, recon: Tensor) -> None:
        """TensorBoard grid: first row inputs, second row reconstructions."""
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        n = min(self.hparams.sample_grid_size, images.shape[0])
        both = torch.cat([images[:n], recon[:n]]).detach().float().clamp(-1, 1).cpu()
        grid = make_grid((both + 1) / 2, nrow=n)  # [3, H', W'] in [0, 1]
        for logger in loggers:
            logger.experiment.add_image("val/inputs_vs_reconstructions", grid, self.global_step)

    def _scale_batches(self) -> Iterator[Tensor]:
        """Images from the train dataloader (the datamodule's if any) for scale measurement."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.train_dataloader() if datamodule is not None else None
        loader = loader if loader is not None else self.trainer.train_dataloader
        if loader is None:
            return
        for batch in loader:
            yield batch["image"]

    def on_fit_end(self) -> None:
        """Measure the latent scale/shift after training (or for an imported VAE without one),
        identical on every rank; log it and, if ``export_dir`` is set, export the VAE."""
        hp = self.hparams
        if hp.measure_scale_batches <= 0:
            return
        if self.generator_steps == 0 and self.vae.has_latent_scale:
            return  # nothing trained: keep an imported VAE's own scale
        self._use_ema_weights()
        scale, shift = self.vae.measure_latent_scale(
            self._scale_batches(), hp.measure_scale_batches, with_shift=hp.measure_shift
        )
        scale, shift = self.trainer.strategy.broadcast((scale, shift), src=0)
        self.vae.set_latent_scale(scale, shift)
        for logger in self.loggers:
            metrics = {"vae/scaling_factor": scale, "vae/shift_factor": shift}
            logger.log_metrics(metrics, step=self.global_step)
        if hp.export_dir is not None:
            if self.trainer.is_global_zero:
                self.vae.save_pretrained(Path(hp.export_dir))
            self.trainer.strategy.barrier("vae_export")

    def _use_ema_weights(self) -> None:
        """At fit end the exported VAE is the EMA average, when an EMA callback is used."""
        from fewstep.lightning.ema import EMA

        for callback in self.trainer.callbacks:
            if isinstance(callback, EMA):
                callback.copy_to(self.vae)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen perceptual network (rebuilt from config); keep the step counter."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("perceptual.")]:
            del state[key]
        checkpoint["vae_generator_steps"] = self.generator_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-insert this module's own perceptual weights so strict loading succeeds."""
        if self.perceptual is not None:
            own = {f"perceptual.{k}": v for k, v in self.perceptual.state_dict().items()}
            checkpoint["state_dict"].update(own)
        self.generator_steps = int(checkpoint.get("vae_generator_steps", 0))
