"""Fixtures of the pipeline tests: one embedded Ray per session (2 CPUs, every process on 127.0.0.1)."""
from __future__ import annotations

import pytest

from tiny_checkpoints import save_tiny_checkpoint as save_tiny_checkpoint_to


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray shared by every test that runs the pipeline; bound to 127.0.0.1, no dashboard."""
    import ray

    from pipeline.local_ray import start_local_ray

    if ray.is_initialized():
        yield ray
        return
    start_local_ray(num_cpus=2, object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint_seed1(tmp_path_factory):
    """A tiny random checkpoint whose panoptic output is not empty at low thresholds (seed 0's is)."""
    return save_tiny_checkpoint_to(tmp_path_factory.mktemp("tiny-m2f-seed1"), seed=1)


@pytest.fixture(scope="session")
def save_tiny_checkpoint():
    return save_tiny_checkpoint_to
