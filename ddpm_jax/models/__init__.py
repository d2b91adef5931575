"""Flax models of ddpm_jax: the DDPM U-Net."""
from ddpm_jax.models.unet import UNet, create_model, get_timestep_embedding

__all__ = ['UNet', 'create_model', 'get_timestep_embedding']
