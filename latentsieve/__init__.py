"""LatentSieve: score generation latents against training latents before rendering."""

__version__ = "0.1.0"
