"""Pool plans from node shapes: every actor fits the node it lands on, every node keeps CPU for read tasks, one
model actor per GPU, decode/write pools sized from costs, and a plan that cannot be placed fails at once."""
from __future__ import annotations

import math

import pytest

from pipeline.pools import (GPU_MODEL_IMAGES_PER_S, PREPROCESS_CPU_SECONDS_PER_IMAGE, READ_TASK_CPUS, NodeShape,
                            PoolPlacementError, alive_nodes, plan_pools)


def cluster(*shapes: tuple, head_cpus: float | None = None) -> list[NodeShape]:
    """(cpus, gpus) per worker; a head first when head_cpus is given."""
    nodes = [NodeShape("head", head_cpus, 0.0, is_head=True)] if head_cpus is not None else []
    return nodes + [NodeShape(f"worker-{i}", float(cpus), float(gpus)) for i, (cpus, gpus) in enumerate(shapes)]


def assert_placeable(plan, nodes: list[NodeShape]) -> None:
    """The plan's own packing puts every actor somewhere, no node beyond its CPUs minus room for a read task or
    beyond its GPUs, and every per-actor request fits at least one node."""
    by_id = {n.node_id: n for n in nodes}
    placed = {"model": 0, "preprocess": 0, "postprocess": 0}
    for node_id, counts in plan.placement.items():
        node = by_id[node_id]
        used = (counts.get("model", 0) * plan.model_cpus + counts.get("preprocess", 0) * plan.preprocess_cpus
                + counts.get("postprocess", 0) * plan.postprocess_cpus)
        assert used <= max(0.0, node.cpus - READ_TASK_CPUS) + 1e-9, (node, counts)
        assert counts.get("model", 0) * plan.model_gpus <= node.gpus
        for stage in placed:
            placed[stage] += counts.get(stage, 0)
    assert placed == {"model": plan.model_actors, "preprocess": plan.preprocess_actors,
                      "postprocess": plan.postprocess_actors}
    assert any(max(0.0, n.cpus - READ_TASK_CPUS) >= plan.model_cpus and n.gpus >= plan.model_gpus for n in nodes)
    assert any(n.cpus - READ_TASK_CPUS >= max(plan.preprocess_cpus, plan.postprocess_cpus) for n in nodes)


@pytest.mark.parametrize("cpus", [1, 2, 4, 16, 64])
def test_single_cpu_node_leaves_cpu_for_read_tasks(cpus):
    nodes = cluster((cpus, 0))
    plan = plan_pools(nodes)
    assert plan.model_gpus == 0 and plan.model_actors >= 1 and plan.model_torch_threads >= 1
    assert plan.reserved_actor_cpus <= cpus - max(0.5, 0.1 * cpus) + 1e-9
    assert_placeable(plan, nodes)


def test_two_core_laptop_gets_one_actor_per_stage_with_fractional_cpus():
    plan = plan_pools(cluster((2, 0)))
    assert (plan.preprocess_actors, plan.model_actors, plan.postprocess_actors) == (1, 1, 1)
    assert plan.reserved_actor_cpus == pytest.approx(1.5, abs=0.01)
    assert plan.preprocess_cpus < 1 and plan.postprocess_cpus < 1
    assert plan.model_torch_threads == 2


@pytest.mark.parametrize("worker_cpus", [1, 2, 3])
def test_small_nodes_get_requests_no_larger_than_a_node(worker_cpus):
    """The issue's clusters: head 1 CPU + two workers of 1, 2 or 3 CPUs (the old plan asked 2.08 / 5.85 CPUs)."""
    nodes = cluster((worker_cpus, 0), (worker_cpus, 0), head_cpus=1)
    plan = plan_pools(nodes)
    assert plan.model_cpus <= worker_cpus - READ_TASK_CPUS
    assert_placeable(plan, nodes)
    assert "head 1 CPU" in plan.nodes and f"2 x worker {worker_cpus} CPU" in plan.nodes


def test_node_summary_is_the_same_whatever_order_ray_lists_the_nodes_in():
    nodes = cluster((2, 0), (8, 1), (2, 0), head_cpus=1)
    assert plan_pools(nodes).nodes == plan_pools(nodes[::-1]).nodes == \
        "head 1 CPU; worker 8 CPU, 1 GPU; 2 x worker 2 CPU"


def test_two_worker_nodes_each_host_a_model_actor_with_their_cores_as_threads():
    nodes = cluster((2, 0), (2, 0), head_cpus=1)
    plan = plan_pools(nodes)
    assert plan.model_actors == 2 and plan.model_torch_threads == 2
    assert plan.placement["worker-0"]["model"] == plan.placement["worker-1"]["model"] == 1


def test_gpu_workers_under_a_head_without_cpus_get_one_model_actor_per_gpu():
    nodes = cluster((4, 1), (4, 1), (4, 1), head_cpus=0)
    plan = plan_pools(nodes)
    assert plan.model_actors == 3 and plan.model_gpus == 1.0 and plan.model_torch_threads is None
    assert "head" not in plan.placement
    assert_placeable(plan, nodes)


def test_gpu_nodes_of_different_sizes_share_one_model_request_that_fits_the_tightest():
    nodes = cluster((8, 8), (4, 1), (32, 0), head_cpus=8)
    plan = plan_pools(nodes)
    assert plan.model_actors == 9
    assert plan.model_cpus <= (8 - 0.8) / 8  # the 8-GPU node has fewer than one spare CPU per GPU
    assert plan.placement["worker-0"]["model"] == 8 and plan.placement["worker-1"]["model"] == 1
    assert_placeable(plan, nodes)


def test_decode_pool_delivers_the_cpu_seconds_the_model_rate_needs():
    nodes = cluster((8, 1), (8, 1), (32, 0), head_cpus=8)
    plan = plan_pools(nodes)
    assert plan.model_images_per_s == pytest.approx(2 * GPU_MODEL_IMAGES_PER_S)
    needed = plan.model_images_per_s * PREPROCESS_CPU_SECONDS_PER_IMAGE
    assert plan.preprocess_actors * min(1.0, plan.preprocess_cpus) >= needed
    assert plan.postprocess_actors < plan.preprocess_actors  # writing costs a third of decoding
    # CPU-only nodes take the decode and write actors; the GPU nodes keep their CPUs for the model actors.
    assert all(counts.get("preprocess", 0) == 0 for node, counts in plan.placement.items() if node in
               ("worker-0", "worker-1"))
    assert_placeable(plan, nodes)


def test_cpu_only_cluster_needs_one_decode_actor_for_a_slow_model():
    plan = plan_pools(cluster((16, 0), (16, 0), (16, 0), (16, 0)))
    assert plan.model_actors == 8 and plan.model_cpus <= 8
    assert plan.preprocess_actors == 1 and plan.postprocess_actors == 1


def test_explicit_pool_sizes_are_kept_and_requests_shrunk_to_fit():
    nodes = cluster((2, 0))
    plan = plan_pools(nodes, preprocess_actors=2, model_actors=2, postprocess_actors=2)
    assert (plan.preprocess_actors, plan.model_actors, plan.postprocess_actors) == (2, 2, 2)
    assert plan.reserved_actor_cpus <= 1.5 + 1e-9
    assert_placeable(plan, nodes)


def test_more_model_actors_than_gpus_is_refused():
    with pytest.raises(PoolPlacementError, match="exceeds the cluster's 1 GPUs"):
        plan_pools(cluster((8, 1)), model_actors=2)


@pytest.mark.parametrize("nodes, use_gpu, match", [
    (cluster((0, 1), (0, 1), head_cpus=0), None, r"0 CPUs \(head 0 CPU; 2 x worker 0 CPU, 1 GPU\)"),
    (cluster((4, 0), head_cpus=0), True, r"no alive Ray node has a GPU \(head 0 CPU; worker 4 CPU\)"),
    (cluster((0.5, 0), (0.5, 0)), None, r"2 x worker 0.5 CPU"),
])
def test_a_plan_that_cannot_be_placed_fails_at_once_naming_the_node_sizes(nodes, use_gpu, match):
    with pytest.raises(PoolPlacementError, match=match):
        plan_pools(nodes, use_gpu=use_gpu)


def test_explicit_sizes_too_large_for_the_nodes_are_refused_with_the_node_sizes():
    with pytest.raises(PoolPlacementError, match="nodes are worker 1 CPU"):
        plan_pools(cluster((1, 0)), preprocess_actors=20, postprocess_actors=20)


@pytest.mark.parametrize("seed", range(40))
def test_random_clusters_either_plan_within_every_node_or_refuse(seed):
    import random

    rng = random.Random(seed)
    nodes = cluster(*[(rng.choice([0, 1, 2, 3, 4, 8, 16, 48]), rng.choice([0, 0, 0, 1, 2, 4, 8]))
                      for _ in range(rng.randint(1, 6))], head_cpus=rng.choice([0, 1, 2, 8]))
    try:
        plan = plan_pools(nodes)
    except PoolPlacementError as error:
        assert "CPU" in str(error)
        return
    assert_placeable(plan, nodes)
    assert plan.model_actors == (sum(math.floor(n.gpus) for n in nodes) or plan.model_actors)


def test_alive_nodes_reads_ray_nodes_skipping_dead_ones_and_marking_the_head():
    ray_nodes = [
        {"NodeID": "a", "Alive": True, "Resources": {"CPU": 1.0, "node:__internal_head__": 1.0}},
        {"NodeID": "b", "Alive": False, "Resources": {"CPU": 2.0}},
        {"NodeID": "c", "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0, "memory": 1e9}},
    ]
    assert alive_nodes(ray_nodes) == [NodeShape("a", 1.0, 0.0, is_head=True), NodeShape("c", 2.0, 1.0)]
