"""Diffuse: Stable Diffusion loading, attention capture and UNet runs (torch, diffusers)."""
