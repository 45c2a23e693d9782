"""Back ends that generate with LatentSieve in the loop (each needs its own optional extra).

- ``latentsieve.integrations.diffusers``: best-of-G text-to-image generation with a diffusers
  pipeline (the ``diffusers`` extra); docs/integrations.md.
"""
