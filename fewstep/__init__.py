"""fewstep: few-step diffusion distillation."""

__version__ = "0.1.0"
