"""Compute only: the density engine, samplers, generator adapters, calibration and batching."""
