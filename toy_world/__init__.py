"""Toy world: captioned procedural scenes with exact ground-truth edits, a one-token-
per-word CLIP tokenizer, an attribute judge, and a training script for a tiny
Stable-Diffusion-format model (see ``toy_world.train``).

Submodules: ``scenes`` (rendering, edits, training batches), ``tokenizer``,
``judge``, ``train``. Importing the package itself does not import diffusers.
"""
