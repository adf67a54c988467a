"""Shared fixtures: tiny random-weight Mask2Former checkpoints (helpers in tests/tiny_checkpoints.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny_checkpoints import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A session-wide tiny checkpoint directory in transformers' layout."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-m2f"))
