"""Integrations of fused-dit-ops into inference frameworks (SGLang diffusion, diffusers)."""
