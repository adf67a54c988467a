"""Pool sizing from cluster resources: never every CPU (read tasks must run), one model actor per GPU."""
from __future__ import annotations

import pytest

from pipeline.pools import plan_pools


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 64])
def test_cpu_cluster_leaves_cpu_for_read_tasks(cpus):
    plan = plan_pools({"CPU": float(cpus)})
    assert plan.model_gpus == 0 and plan.model_actors >= 1
    assert plan.reserved_actor_cpus <= cpus - max(0.5, 0.1 * cpus) + 1e-9
    assert plan.reserved_actor_cpus + plan.read_task_cpus <= cpus
    assert plan.model_torch_threads >= 1


def test_two_core_laptop_gets_one_actor_per_stage_with_fractional_cpus():
    plan = plan_pools({"CPU": 2.0})
    assert (plan.preprocess_actors, plan.model_actors, plan.postprocess_actors) == (1, 1, 1)
    assert plan.reserved_actor_cpus == pytest.approx(1.5, abs=0.01)
    assert plan.preprocess_cpus < 1 and plan.postprocess_cpus < 1
    assert plan.model_torch_threads == 2


def test_gpu_cluster_gets_one_model_actor_per_gpu_each_with_one_gpu():
    plan = plan_pools({"CPU": 32.0, "GPU": 4.0})
    assert plan.model_actors == 4 and plan.model_gpus == 1.0
    assert plan.preprocess_actors > plan.model_actors
    assert plan.model_torch_threads is None
    assert plan.reserved_actor_cpus <= 32 - 3.2


def test_explicit_pool_sizes_are_kept_and_cpus_scaled_to_fit():
    plan = plan_pools({"CPU": 2.0}, preprocess_actors=2, model_actors=2, postprocess_actors=2)
    assert (plan.preprocess_actors, plan.model_actors, plan.postprocess_actors) == (2, 2, 2)
    assert plan.reserved_actor_cpus <= 1.5 + 1e-9


def test_more_model_actors_than_gpus_is_refused():
    with pytest.raises(RuntimeError, match="exceeds the cluster's 1 GPUs"):
        plan_pools({"CPU": 8.0, "GPU": 1.0}, model_actors=2)
