"""Exports: diffusers folders (transformer / VAE / scheduler) of teachers and students."""
