"""twostep: distill a few-step flow-matching text-to-image model into a 2-step generator (Z-Image Turbo++)."""

__version__ = "0.2.2"
