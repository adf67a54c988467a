"""Synthetic image files for the pipeline tests (imported by the tests; fixtures live in conftest.py)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(array: np.ndarray, fmt: str = "PNG", **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_image(path: Path, height: int, width: int, *, seed: int = 0, fmt: str | None = None) -> Path:
    fmt = fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(random_rgb(height, width, seed), fmt))
    return path
