"""Backbone adapters: each hides one model family behind `denoise(x_sigma, sigma, text) -> x0_hat`."""
from .zimage import ZImageBackbone, tiny_zimage_config

__all__ = ["ZImageBackbone", "tiny_zimage_config"]
