"""What ``latentsieve report`` measured, handed from the measuring (``latentsieve.report``) to
the page (``latentsieve.report_page``); its own module so that neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

GRID_SIZE = 16  # samples in each of the highest / lowest grids


@dataclass
class ReportData:
    """Everything measured, kept for the page: arrays for plots beside the JSON numbers."""

    numbers: dict[str, Any]
    log_density: np.ndarray
    calibration: np.ndarray
    quality: dict[str, np.ndarray]
    images: np.ndarray | None = None  # (n, H, W) or (n, H, W, 3) in [0, 1]
    seeds: list[int] = field(default_factory=list)

    def grid_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the ``GRID_SIZE`` highest (best first) and lowest (worst first) scores."""
        order = np.argsort(-self.log_density, kind="stable")
        return order[:GRID_SIZE], order[::-1][:GRID_SIZE]
