"""Distilling a frozen teacher into a few-step student with one DistillationMethod object, and
validating the student against the teacher: GenEval-protocol shapes scores, fidelity to the
teacher's samples from the same noise, NFE and measured latency."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from fewstep.diffusion.guidance import guidance_passes
from fewstep.diffusion.samplers import Sampler
from fewstep.distill.base import DistillationMethod, DistillBatch, Models
from fewstep.lightning.checkpoints import TeacherMismatchError, is_student, load_teacher
from fewstep.lightning.eval_metrics import Metrics
from fewstep.lightning.fsdp_params import clean_name, fsdp_root, through_root_forward
from fewstep.lightning.latent_module import LatentDiffusionModule
from fewstep.lightning.sampling import generate
from fewstep.lightning.student_eval import StudentEvaluation
from fewstep.lightning.teacher_module import default_optimizer, network_denoiser
from fewstep.models.fsdp_params import root_trainable_names
from fewstep.models.lora import LoraSettings, add_lora, is_adapter, merged
from fewstep.utils.fingerprint import weights_hash

TEACHER_PREFIX = "teacher."
STUDENT_PREFIX = "student."


def sampler_record(sampler: Sampler, steps: Iterable[int], process: Any) -> dict[str, Any]:
    """A sampler as plain data: class_path, init_args and the timesteps walked per step count."""
    cls = type(sampler)
    walked = {int(n): sampler.with_steps(int(n)).timesteps(process).tolist() for n in steps}
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": sampler.init_args(),
        "timesteps": walked,
    }


class StudentModule(StudentEvaluation, LatentDiffusionModule):
    """Trains a student network (initialised from the teacher's EMA weights) with ``method``.

    The teacher (from ``teacher_config`` + ``teacher_ckpt``) is frozen: never optimised, never
    EMA-averaged (the EMA callback averages ``ema_target`` = the student), and not saved in
    checkpoints — only its identity (paths + sha256 of its weights), verified on resume. With
    ``method.num_optimizers == 2`` training uses manual optimisation (student step, then the
    method's discriminator step; a method may skip the student step by a two time-scale rule,
    ``generator_step_due(global_step)``); clip with ``gradient_clip_val`` here (Lightning refuses
    Trainer.gradient_clip_val under manual optimisation; in automatic mode either works).

    The student is sampled by ``sampler`` (its schedule is saved in checkpoints) through
    ``method.student_denoiser`` and the same Sampler code as the teacher. Validation compares,
    for each n in ``eval_steps``, the student's n-step samples with the teacher's reference
    samples (``teacher_sampler`` + ``guidance_scale``) from the same noise; NFE counts network
    forward passes per image (a CFG step costs 2).

    With ``lora`` (a LoraSettings: rank, alpha, dropout, target_modules) the student is the
    teacher's copy with peft LoRA adapters (Hu et al. 2022): only they are trained, EMA-averaged
    and saved; the frozen base weights are referenced by sha256 (``student_base``) and restored
    from the teacher on load. ``export_network()`` merges them for pipeline exports.
    """

    def __init__(
        self,
        teacher_config: str,
        teacher_ckpt: str | None,
        method: DistillationMethod,
        sampler: Sampler,
        eval_steps: list[int] | None = None,
        guidance_scale: float | None = None,
        teacher_sampler: Sampler | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        disc_optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        vae_path: str | None = None,
        val_num_samples: int = 64,
        seed: int = 0,
        use_teacher_ema: bool = True,
        disc_lr_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        student_network: nn.Module | None = None,
        grid_samples: int = 8,
        fidelity_features: str | None = None,
        diversity_prompts: int = 4,
        diversity_seeds: int = 8,
        metrics: Metrics | None = None,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        objects = ["method", "sampler", "teacher_sampler", "student_network", "metrics", "lora"]
        callables = ["optimizer", "disc_optimizer", "lr_scheduler", "disc_lr_scheduler"]
        self.save_hyperparameters(ignore=[*objects, *callables])
        self.eval_steps = [int(n) for n in (eval_steps if eval_steps is not None else [1, 2, 4])]
        if val_num_samples < 0 or any(n < 1 for n in self.eval_steps):
            raise ValueError(
                f"StudentModule: val_num_samples must be >= 0 and eval_steps >= 1, got "
                f"{val_num_samples} and {self.eval_steps}"
            )
        reference = load_teacher(teacher_config, teacher_ckpt, use_teacher_ema)
        # a teacher fit, or a distilled student (e.g. guidance-distilled: one pass per CFG step)
        network = reference.student if is_student(reference) else reference.network
        self.teacher = network  # registered (moves with the module), stripped on save
        self.process, self.prediction = reference.process, reference.prediction
        self.teacher_timesteps = getattr(reference, "timestep_sampler", None)
        self.teacher_identity = {
            "config": str(teacher_config),
            "ckpt": str(teacher_ckpt),
            "sha256": weights_hash(self.teacher),
            "use_ema": bool(use_teacher_ema),
        }
        self.guidance_scale = float(
            guidance_scale if guidance_scale is not None else reference.guidance_scale
        )
        self.teacher_sampler = teacher_sampler or reference.sampler
        self.vae_path = vae_path if vae_path is not None else getattr(reference, "vae_path", None)
        self.student = (
            student_network
            if student_network is not None
            else copy.deepcopy(self.teacher).requires_grad_(True)
        ).train()
        self._add_lora(lora, from_teacher=student_network is None)
        self.method, self.sampler = method, sampler
        for n in self.eval_steps:  # fail now, not at the first validation
            try:
                sampler.with_steps(n).timesteps(self.process)
            except ValueError as err:
                raise ValueError(f"StudentModule eval_steps={self.eval_steps}: {err}") from None
        self.optimizer, self.disc_optimizer = optimizer, disc_optimizer
        self.lr_scheduler, self.disc_lr_scheduler = lr_scheduler, disc_lr_scheduler
        self.gradient_clip_val, self.gradient_clip_algorithm = (
            gradient_clip_val,
            gradient_clip_algorithm,
        )
        self.val_num_samples, self.seed, self.grid_samples = val_num_samples, seed, grid_samples
        self.automatic_optimization = method.num_optimizers == 1
        self.register_load_state_dict_post_hook(_forgive_unsaved_weights)
        self.method.setup(self.models)
        self._build_metrics()
        self.set_eval_metrics(metrics)
        self._val_scored = 0
        self._trained_steps = 0  # global_step of the loaded checkpoint (eval table title)
        self._grid: dict[str, list[np.ndarray]] = {}
        self._captions: list[str] = []

    # --- networks ------------------------------------------------------------------------------

    def _add_lora(self, lora: LoraSettings | None, from_teacher: bool) -> None:
        """With ``lora``, adapters on the student (only they train, are EMA-averaged and saved);
        its frozen base weights are referenced by their sha256, like the teacher's."""
        self.lora, self.student_base, self._base_keys = lora, None, frozenset()
        if lora is None:
            return
        sha = self.teacher_identity["sha256"] if from_teacher else weights_hash(self.student)
        self.lora_modules = add_lora(self.student, lora)
        self._base_keys = frozenset(k for k in self.student.state_dict() if not is_adapter(k))
        self.student_base = {"sha256": sha, "from": "teacher" if from_teacher else "network"}

    def export_network(self) -> nn.Module:
        """The student as a plain network: a LoRA student's adapters merged into a copy."""
        return merged(self.student) if self.lora is not None else self.student

    @property
    def ema_target(self) -> nn.Module:
        """The network the EMA callback averages: the student only."""
        return self.student

    @property
    def takes_pooled_text(self) -> bool:
        """Whether the networks take a pooled text vector (FLUX.1's ``vector_in``): only then is
        a batch's ``cond`` passed on (a DiT has no pooled-text input and ignores it)."""
        return hasattr(self.teacher, "vector_in")

    @property
    def models(self) -> Models:
        """Student and teacher as denoisers on the teacher's process (built per call); a
        guidance-embedded network (FLUX.1-dev) is fed ``guidance=guidance_scale`` by default."""
        scale = self.guidance_scale
        return Models(
            student=network_denoiser(self.student, self.process, self.prediction, scale),
            teacher=network_denoiser(self.teacher, self.process, self.prediction, scale),
            process=self.process,
            student_sampler=self.sampler,
            teacher_sampler=self.teacher_sampler,
            guidance_scale=self.guidance_scale,
            teacher_timesteps=self.teacher_timesteps,
        )

    def on_fit_start(self) -> None:
        """Hand the method the FSDP root sharding it (None when not sharded): LCM's θ⁻ is laid
        out like the student there."""
        root = fsdp_root(self.trainer.strategy.model)
        if root is not None and self.method.num_optimizers == 2:
            _refuse_shared_root_unit(root, type(self.method).__name__)
        self.method.attach_fsdp_root(root)

    def train(self, mode: bool = True) -> StudentModule:
        """Train mode for everything but the frozen teacher, which stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    # --- sampling ------------------------------------------------------------------------------

    def student_sampler(self, steps: int) -> Sampler:
        """The student's sampler walking ``steps`` steps."""
        return self.sampler.with_steps(steps)

    def student_latents(
        self,
        text: Tensor,
        text_mask: Tensor,
        noise: Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        cond: Tensor | None = None,
    ) -> Tensor:
        """Student samples from ``noise`` through ``method.student_denoiser`` (no CFG); ``cond``:
        the pooled text vectors [B, Dv] of a network that takes them."""
        sampler = self.sampler if steps is None else self.student_sampler(steps)
        denoiser = self.method.student_denoiser(self.models.student)
        conds = {"text": text, "text_mask": text_mask.bool()}
        if cond is not None and self.takes_pooled_text:
            conds["cond"] = cond
        return sampler(denoiser.bind(**conds), noise, generator)

    def teacher_latents(
        self, text: Tensor, text_mask: Tensor, noise: Tensor, cond: Tensor | None = None
    ) -> Tensor:
        """The teacher's reference samples (``teacher_sampler`` at ``guidance_scale``; the null
        text only for two-pass CFG, not for a guidance-embedded teacher)."""
        scale, teacher = self.guidance_scale, self.models.teacher
        null = self.null_text() if guidance_passes(teacher, scale) == 2 else None
        cond = cond if self.takes_pooled_text else None
        return generate(
            teacher, self.teacher_sampler, text, text_mask, noise, scale, null, cond=cond
        )

    @property
    def teacher_nfe(self) -> int:
        """Teacher network passes per image: sampler NFE, doubled by two-pass CFG (one pass per
        step for a guidance-embedded teacher)."""
        return self.teacher_sampler.nfe * guidance_passes(self.models.teacher, self.guidance_scale)

    # --- training ------------------------------------------------------------------------------

    def distill_batch(self, batch: dict[str, Any], generator: torch.Generator) -> DistillBatch:
        """The method's view of a CachedLatentDataModule batch."""
        null = self.null_text()
        if null is None:
            raise ValueError(
                "StudentModule needs the empty-caption embedding: the datamodule has no "
                "null_text() (use fewstep.data.datamodule.CachedLatentDataModule)."
            )
        x0, text = batch["latents"], batch["text"]
        b = x0.shape[0]
        null_text = null[0].to(text.device, text.dtype).expand(b, *null[0].shape[1:])
        null_mask = null[1].to(text.device).bool().expand(b, *null[1].shape[1:])
        pooled, null_pooled = self._pooled(batch, null.cond)
        return DistillBatch(
            latents=x0,
            text=text,
            text_mask=batch["text_mask"].bool(),
            null_text=null_text,
            null_mask=null_mask,
            generator=generator,
            noise=batch.get("noise"),
            pooled=pooled,
            null_pooled=null_pooled,
        )

    def _pooled(
        self, batch: dict[str, Any], null: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The batch's pooled text vectors [B, Dv] and the null caption's, expanded to the batch
        (None, None for networks without a pooled-text input or batches without ``cond``)."""
        pooled = batch.get("cond") if self.takes_pooled_text else None
        if pooled is None:
            return None, None
        if null is None:
            raise ValueError(
                "StudentModule: the batches carry a pooled text vector (cond) but the "
                "datamodule's null_text() has none; use CachedLatentDataModule with pooled_text "
                "'cache' or 'mean_tokens', as the teacher was trained with."
            )
        null_pooled = null.to(pooled.device, pooled.dtype).expand(pooled.shape[0], -1)
        return pooled, null_pooled

    def _log_losses(self, prefix: str, loss: Tensor, logs: dict[str, Tensor], b: int) -> None:
        """Log a loss and the method's scalars under ``prefix``."""
        self.log(f"{prefix}loss", loss.detach(), prog_bar=True, batch_size=b)
        for name, value in logs.items():
            self.log(f"{prefix}{name}", value.detach().float(), batch_size=b)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """One distillation step (automatic), or student + discriminator steps (manual)."""
        distill = self.distill_batch(batch, self.step_generator(batch_idx, batch["latents"].device))
        b = distill.latents.shape[0]
        if self.automatic_optimization:
            loss, logs = self.method.generator_loss(distill, self.models)
            self._log_losses("train/", loss, logs, b)
            return loss
        self._manual_step(distill)
        return None

    def _manual_step(self, batch: DistillBatch) -> None:
        """Student step (when due) then discriminator step, each with only its own parameters
        trainable (toggled), each loss the output of an FSDP root forward of its own (under FSDP:
        ``through_root_forward``), backward through the precision plugin, gradients clipped in
        ``on_before_optimizer_step`` (after AMP unscaling); each stepped optimiser's scheduler
        stepped per batch."""
        opt_g, opt_d = self.optimizers()
        b = batch.latents.shape[0]
        stepped = [opt_d.optimizer]
        if self.method.generator_step_due(self.global_step):
            with self.toggled_optimizer(opt_g):
                loss, logs = through_root_forward(
                    self, self.method.generator_loss, batch, self.models
                )
                self.manual_backward(loss)
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
            self.method.after_student_step(self.models)
            self._log_losses("train/", loss, logs, b)
            stepped.append(opt_g.optimizer)
        with self.toggled_optimizer(opt_d):
            loss, logs = through_root_forward(
                self, self.method.discriminator_loss, batch, self.models
            )
            self.manual_backward(loss)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
        self._log_losses("train/disc_", loss, logs, b)
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None and any(scheduler.optimizer is o for o in stepped):
                scheduler.step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Automatic optimisation: the optimiser step, then the method's after-step hook."""
        super().optimizer_step(*args, **kwargs)
        self.method.after_student_step(self.models)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Automatic mode: Trainer.gradient_clip_val if set, else this module's."""
        val = gradient_clip_val if gradient_clip_val is not None else self.gradient_clip_val
        algorithm = gradient_clip_algorithm or self.gradient_clip_algorithm
        if val:
            self.clip_all_gradients(optimizer, val, algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Manual mode: clip each optimiser's gradients (called after AMP unscaling)."""
        if not self.automatic_optimization and self.gradient_clip_val:
            self.clip_all_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        """Student optimiser (+ the method's discriminator optimiser), per-step schedulers."""
        student = [p for p in self.student.parameters() if p.requires_grad]
        optimizers = [self.optimizer(student)]
        factories = [self.lr_scheduler]
        if self.method.num_optimizers == 2:
            disc = [p for p in self.method.discriminator_parameters() if p.requires_grad]
            if not disc:
                raise ValueError(
                    f"{type(self.method).__name__} has num_optimizers=2 but no "
                    "discriminator_parameters()"
                )
            optimizers.append(self.disc_optimizer(disc))
            factories.append(self.disc_lr_scheduler)
        configs = []
        for opt, factory in zip(optimizers, factories, strict=True):
            config: dict[str, Any] = {"optimizer": opt}
            if factory is not None:
                config["lr_scheduler"] = {"scheduler": factory(opt), "interval": "step"}
            configs.append(config)
        return configs[0] if len(configs) == 1 else configs

    # --- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the teacher's weights (keep its identity) and record the student's schedule."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        checkpoint["teacher"] = dict(self.teacher_identity)
        if self.student_base is not None:  # LoRA: the adapters only, the base by fingerprint
            for key in self._base_keys:
                state.pop(STUDENT_PREFIX + key, None)
            checkpoint["student_base"] = dict(self.student_base)
        walked = self.method.student_denoiser(self.models.student).process  # e.g. flow view
        checkpoint["student_sampler"] = sampler_record(
            self.sampler, sorted({*self.eval_steps, self.sampler.steps}), walked
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the teacher is the one the student was distilled from, and put its (not
        saved) weights back into the state dict so that strict loading works."""
        saved = checkpoint.get("teacher")
        if saved is None:
            raise TeacherMismatchError(
                "StudentModule: this checkpoint records no teacher identity (not a "
                "StudentModule checkpoint?)"
            )
        if saved["sha256"] != self.teacher_identity["sha256"]:
            raise TeacherMismatchError(
                f"StudentModule: the teacher in teacher_ckpt '{self.teacher_identity['ckpt']}' "
                f"(sha256 {self.teacher_identity['sha256'][:12]}, use_ema="
                f"{self.teacher_identity['use_ema']}) is not the teacher this checkpoint was "
                f"distilled from ('{saved['ckpt']}', sha256 {saved['sha256'][:12]}, use_ema="
                f"{saved.get('use_ema')}); point model.init_args.teacher_ckpt at that file."
            )
        state = checkpoint.get("state_dict")  # None under FSDP: loaded (strict) before this hook
        for name, value in self.teacher.state_dict().items() if state is not None else []:
            state.setdefault(TEACHER_PREFIX + name, value)
        self._restore_student_base(checkpoint)
        self._trained_steps = int(checkpoint.get("global_step", 0))  # `validate` starts at 0

    def _restore_student_base(self, checkpoint: dict[str, Any]) -> None:
        """A LoRA student's checkpoint holds its adapters only: check the base weights' sha256
        and put them (this module's, not saved) back into the state dict for strict loading."""
        saved = checkpoint.get("student_base")
        if (saved is None) != (self.student_base is None):
            trained = "with" if saved is not None else "without"
            raise TeacherMismatchError(
                f"StudentModule: this checkpoint was trained {trained} LoRA adapters; set "
                "model.init_args.lora as in the run that wrote it."
            )
        if saved is None:
            return
        if saved["sha256"] != self.student_base["sha256"]:  # (under FSDP after the loading)
            raise TeacherMismatchError(
                f"StudentModule: the LoRA student's base weights (sha256 "
                f"{self.student_base['sha256'][:12]}) are not those its adapters were trained on "
                f"(sha256 {saved['sha256'][:12]}); use the teacher_config/teacher_ckpt (or "
                "student_network) of that run."
            )
        if "state_dict" not in checkpoint:  # FSDP loaded it, forgiving the base
            return
        state, base = checkpoint["state_dict"], self.student.state_dict()
        for key in self._base_keys:
            state.setdefault(STUDENT_PREFIX + key, base[key])


def _refuse_shared_root_unit(root: FSDP, method: str) -> None:
    """One clear error at fit start when two optimisers would share the FSDP root unit."""
    shared = root_trainable_names(root)
    if shared:
        raise ValueError(
            f"FSDP with two optimisers ({method}): the root FSDP unit holds trainable parameters "
            f"({', '.join(shared[:3])}, ...), which FSDP1 can neither save per optimiser nor "
            "freeze per step. Use the two-optimiser overlay, -c "
            "configs/fsdp/pixart_xl_two_optimizers.yaml or -c configs/fsdp/flux_two_optimizers"
            ".yaml, or add the network classes (fewstep.models.dit.DiT or fewstep.models.flux."
            "Flux) and the heads' (fewstep.models.ladd_discriminator.FeatureDiscriminatorHeads, "
            "fewstep.models.adaptive_weight.AdaptiveWeight) to trainer.strategy.init_args."
            "auto_wrap_policy, so that each is an FSDP unit of its own."
        )


def _forgive_unsaved_weights(module: StudentModule, keys: Any) -> None:
    """Strict loading without the weights no checkpoint holds (the frozen teacher, a LoRA
    student's base): FSDPStrategy loads the model state before ``on_load_checkpoint`` can put
    them back, so they are dropped from the missing keys and the module keeps its own (the
    teacher's and the base's sha256 are still checked in ``on_load_checkpoint``)."""
    base = {STUDENT_PREFIX + key for key in module._base_keys}
    for key in list(keys.missing_keys):
        name = clean_name(key)
        if name.startswith(TEACHER_PREFIX) or name in base:
            keys.missing_keys.remove(key)
