"""The latent store on disk: build, manifest, checksums, calibration, load, versioning.

Used by the workers and the service; imports neither.
"""
