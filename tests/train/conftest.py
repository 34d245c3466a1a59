"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small images of coloured shapes, plus one broken file that must be skipped."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        image = np.zeros((40, 40, 3), dtype=np.uint8) + rng.integers(0, 60, 3, dtype=np.uint8)
        top, left, size = rng.integers(0, 20, 2).tolist() + [int(rng.integers(10, 20))]
        image[top : top + size, left : left + size] = rng.integers(120, 256, 3, dtype=np.uint8)
        Image.fromarray(image).save(root / f"img_{i:03d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    return root
