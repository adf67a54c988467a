"""Fixtures of the pipeline tests: one embedded Ray per session (2 CPUs, every process on 127.0.0.1)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray shared by every test that runs the pipeline; bound to 127.0.0.1, no dashboard."""
    import ray

    from pipeline.segment_job import start_local_ray

    if ray.is_initialized():
        yield ray
        return
    start_local_ray(num_cpus=2, object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()


def _shared_save_tiny_checkpoint():
    """tests/conftest.py's `save_tiny_checkpoint` (a plain `import conftest` here would find this file)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("m2f_shared_test_fixtures",
                                                  Path(__file__).resolve().parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint_seed1(tmp_path_factory):
    """A tiny random checkpoint whose panoptic output is not empty at low thresholds (seed 0's is)."""
    return _shared_save_tiny_checkpoint()(tmp_path_factory.mktemp("tiny-m2f-seed1"), seed=1)


@pytest.fixture(scope="session")
def save_tiny_checkpoint():
    return _shared_save_tiny_checkpoint()
