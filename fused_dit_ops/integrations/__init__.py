"""Integrations of fused-dit-ops into inference frameworks (SGLang diffusion, diffusers)."""

# the diffusers model families ``fused_dit_ops.patch`` takes: one module each, holding a ``FAMILY``
# description for the engine (engine.py); a new family adds its module here
FAMILY_MODULES = ("diffusers_qwen", "diffusers_flux", "diffusers_flux2", "diffusers_wan")
