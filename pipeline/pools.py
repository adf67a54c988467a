"""Pool sizes and per-actor resources, planned node by node so one command fits a laptop, a cluster of small
nodes and a GPU cluster whose head has no CPUs.

Ray Data gives every actor of a pool the same request, and Ray places each actor on one node: a request
larger than every node is pending forever. The plan therefore sizes requests from the alive nodes' shapes
and checks, by packing the actors onto those shapes, that the whole plan fits; when it cannot, it fails at
once naming the node sizes.

Rules (each pool size overridable by the CLI):
- every node keeps `_read_reserve(cpus)` CPUs out of the actor pools: read tasks (a quarter CPU each) must
  find room, or Ray Data hangs without an error (ray-project/ray#44687);
- with GPUs: one model actor per GPU (`num_gpus=1`) and at most `GPU_MODEL_ACTOR_CPUS` (less when a GPU node
  has fewer CPUs per GPU); without: model actors of up to `CPU_MODEL_ACTOR_MAX_CPUS` on every node with room
  for one, whose torch uses the node's cores;
- decode/resize and post-process actors from costs: enough CPU-seconds per second for the model pool's
  rate (`GPU_MODEL_IMAGES_PER_S` per GPU, `CPU_MODEL_IMAGES_PER_CPU_S` per model CPU) with `HEADROOM`;
- side actors are packed onto CPU-only nodes first (Ray's scheduler also keeps CPU-only work off GPU nodes),
  and shrink (fewer actors, then smaller requests) until the plan fits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["NodeShape", "PoolPlan", "PoolPlacementError", "alive_nodes", "plan_pools", "READ_TASK_CPUS",
           "PREPROCESS_CPU_SECONDS_PER_IMAGE", "POSTPROCESS_CPU_SECONDS_PER_IMAGE", "GPU_MODEL_IMAGES_PER_S",
           "CPU_MODEL_IMAGES_PER_CPU_S", "MODEL_ACTOR_ENV_VARS"]

READ_TASK_CPUS = 0.25
# One core, one 480x640 JPEG decoded and resized to 800x1088 uint8: 6.0-7.2 ms (measured 2026-12-01 on the 2-core
# dev machine, one torch thread), rounded up for larger and more complex JPEGs.
PREPROCESS_CPU_SECONDS_PER_IMAGE = 0.010
# One core, one image of ~75 segments (~1800 run lengths each): RLE strings by pycocotools and its share of the
# Parquet writes, 4.0 ms (measured 2026-12-01, same machine; areas and boxes come from the model stage).
POSTPROCESS_CPU_SECONDS_PER_IMAGE = 0.006
# Swin-T Mask2Former, 800x1088, bf16, batch 16 on one H200: 97.7-99.5 images/s (gpu-facts.md).
GPU_MODEL_IMAGES_PER_S = 100.0
# Same model in float32 on CPU: ~9.9 s per image on 2 threads (environment-facts.md).
CPU_MODEL_IMAGES_PER_CPU_S = 0.05
HEADROOM = 1.5  # image sizes and JPEG complexity vary; a starved model costs more than an idle decoder
# The model actor's process environment. torch backs its CPU allocations of 2 MB and more with transparent huge
# pages (where the kernel's THP mode is `madvise`, the common default): a CPU forward pass allocates and frees
# hundreds of MB of activations per batch, each page faulted in anew. Swin-T, 800x1088, batch 4, 2 threads:
# 22.3 -> 17.0 s per batch, page faults 5.9M -> 0.19M, system time 13.1 -> 6.1 s (measured 2026-12-01).
MODEL_ACTOR_ENV_VARS = {"THP_MEM_ALLOC_ENABLE": "1"}
GPU_MODEL_ACTOR_CPUS = 1.0  # host side of a GPU model actor: batching, copies, run lengths to the host
CPU_MODEL_ACTOR_MAX_CPUS = 8.0  # torch's intra-op scaling flattens beyond this; more actors instead
SIDE_ACTOR_MIN_CPUS = 0.25
_SMALLEST_REQUEST = 0.05  # a side actor asking for less than this would be squeezed into any corner
_CPU_MODE_SIDE_ALLOWANCE = 0.5  # left beside each CPU model actor's node share for decode and writing


class PoolPlacementError(RuntimeError):
    """The actor pools cannot be placed on the cluster's nodes (raised before any actor is started)."""


@dataclass(frozen=True)
class NodeShape:
    """What one alive Ray node offers to the job."""

    node_id: str
    cpus: float
    gpus: float = 0.0
    is_head: bool = False

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{'head' if self.is_head else 'worker'} {self.cpus:g} CPU{gpus}"


def alive_nodes(ray_nodes: list[dict]) -> list[NodeShape]:
    """`ray.nodes()` entries -> the shapes of the alive ones (dead nodes stay listed in Ray's table)."""
    shapes = []
    for node in ray_nodes:
        if not node.get("Alive", node.get("alive", False)):
            continue
        resources = node.get("Resources", {})
        shapes.append(NodeShape(node_id=str(node.get("NodeID", "")), cpus=float(resources.get("CPU", 0.0)),
                                gpus=float(resources.get("GPU", 0.0)),
                                is_head="node:__internal_head__" in resources))
    return shapes


@dataclass(frozen=True)
class PoolPlan:
    preprocess_actors: int
    model_actors: int
    postprocess_actors: int
    preprocess_cpus: float
    model_cpus: float
    model_gpus: float
    postprocess_cpus: float
    read_task_cpus: float
    model_torch_threads: int | None  # None: leave torch's default (GPU actors)
    cluster_cpus: float
    cluster_gpus: float
    nodes: str = ""  # e.g. "head 0 CPU; 2 x worker 8 CPU, 1 GPU"
    model_images_per_s: float = 0.0  # the model pool's expected rate, from the cost constants
    placement: dict = field(default_factory=dict)  # node id -> {"model": n, "preprocess": n, "postprocess": n}

    @property
    def reserved_actor_cpus(self) -> float:
        return (self.preprocess_actors * self.preprocess_cpus + self.model_actors * self.model_cpus
                + self.postprocess_actors * self.postprocess_cpus)

    def as_dict(self) -> dict:
        return {**asdict(self), "reserved_actor_cpus": round(self.reserved_actor_cpus, 3)}


def plan_pools(nodes: list[NodeShape], *, preprocess_actors: int | None = None, model_actors: int | None = None,
               postprocess_actors: int | None = None, use_gpu: bool | None = None) -> PoolPlan:
    """A PoolPlan that fits `nodes` (see `alive_nodes`); PoolPlacementError when none does."""
    nodes = list(nodes)
    summary = _describe_nodes(nodes)
    cpus = sum(n.cpus for n in nodes)
    gpus = sum(math.floor(n.gpus) for n in nodes)
    with_gpu = gpus >= 1 if use_gpu is None else use_gpu
    if with_gpu and gpus < 1:
        raise PoolPlacementError(f"a GPU run was asked for but no alive Ray node has a GPU ({summary})")
    if cpus < 1:
        raise PoolPlacementError(f"the Ray cluster has {cpus:g} CPUs ({summary}); the pipeline needs at least 1 "
                                 "for reading, decoding and writing")
    capacity = {n.node_id: _round_down(max(0.0, n.cpus - _read_reserve(n.cpus))) for n in nodes}

    if with_gpu:
        model_actors, model_cpus, placement = _gpu_model_pool(nodes, capacity, model_actors, summary)
        threads, model_rate = None, model_actors * GPU_MODEL_IMAGES_PER_S
    else:
        model_actors, model_cpus, threads, placement = _cpu_model_pool(nodes, capacity, model_actors, summary)
        model_rate = model_actors * model_cpus * CPU_MODEL_IMAGES_PER_CPU_S
    free = {node_id: capacity[node_id] - placement[node_id]["model"] * model_cpus for node_id in capacity}

    wanted = {stage: _side_pool_from_cost(model_rate * seconds * HEADROOM, given)
              for stage, seconds, given in (("preprocess", PREPROCESS_CPU_SECONDS_PER_IMAGE, preprocess_actors),
                                            ("postprocess", POSTPROCESS_CPU_SECONDS_PER_IMAGE, postprocess_actors))}
    side = _fit_side_pools(nodes, free, wanted, fixed_counts={"preprocess": preprocess_actors is not None,
                                                              "postprocess": postprocess_actors is not None})
    if side is None:
        raise PoolPlacementError(
            f"no room for the decode and write actors beside {model_actors} model actor(s) of {model_cpus:g} CPU: "
            f"nodes are {summary}, each keeping some CPU for read tasks. Add CPU nodes, or pass fewer "
            "--model-actors / --preprocess-actors / --postprocess-actors")
    (pre_count, pre_cpus), (post_count, post_cpus), side_placement = side
    for node_id, counts in side_placement.items():
        placement[node_id].update(counts)
    return PoolPlan(preprocess_actors=pre_count, model_actors=model_actors, postprocess_actors=post_count,
                    preprocess_cpus=pre_cpus, model_cpus=model_cpus, model_gpus=1.0 if with_gpu else 0.0,
                    postprocess_cpus=post_cpus, read_task_cpus=READ_TASK_CPUS, model_torch_threads=threads,
                    cluster_cpus=cpus, cluster_gpus=float(gpus), nodes=summary,
                    model_images_per_s=round(model_rate, 3),
                    placement={k: v for k, v in placement.items() if any(v.values())})


def _read_reserve(cpus: float) -> float:
    """CPUs a node keeps free of actors for read tasks: two of them, or a tenth of a big node."""
    return min(cpus, max(2 * READ_TASK_CPUS, 0.1 * cpus))


def _gpu_model_pool(nodes: list[NodeShape], capacity: dict, requested: int | None,
                    summary: str) -> tuple[int, float, dict]:
    gpu_nodes = [n for n in nodes if n.gpus >= 1]
    total = sum(math.floor(n.gpus) for n in gpu_nodes)
    count = total if requested is None else requested
    if count > total:
        raise PoolPlacementError(f"--model-actors {count} exceeds the cluster's {total} GPUs ({summary})")
    if count < 1:
        raise PoolPlacementError("--model-actors must be at least 1")
    # The same request for every model actor: what the GPU node with the fewest CPUs per GPU can give each GPU.
    cpus = _round_down(min([GPU_MODEL_ACTOR_CPUS]
                           + [capacity[n.node_id] / math.floor(n.gpus) for n in gpu_nodes]))
    placement = {n.node_id: {"model": 0} for n in nodes}
    left = count
    for node in sorted(gpu_nodes, key=lambda n: -n.gpus):
        placed = min(left, math.floor(node.gpus))
        placement[node.node_id]["model"] = placed
        left -= placed
    return count, cpus, placement


def _cpu_model_pool(nodes: list[NodeShape], capacity: dict, requested: int | None,
                    summary: str) -> tuple[int, float, int, dict]:
    usable = {n.node_id: max(0.0, capacity[n.node_id] - _CPU_MODE_SIDE_ALLOWANCE) for n in nodes}
    if requested is not None and requested < 1:
        raise PoolPlacementError("--model-actors must be at least 1")
    if requested is None:
        # Every node with room for a one-CPU model actor hosts some, each of at most CPU_MODEL_ACTOR_MAX_CPUS;
        # the request is the smallest such share, so every one of those nodes fits its actors.
        hosts = [node_id for node_id, room in usable.items() if room >= 1.0]
        if hosts:
            size = min(usable[h] / math.ceil(usable[h] / CPU_MODEL_ACTOR_MAX_CPUS) for h in hosts)
        else:  # a one-CPU machine: the roomiest node shares what it has between the model and the side actors
            roomiest = max(capacity, key=capacity.get)
            size = capacity[roomiest] / 2
            usable[roomiest] = size
    else:
        # The largest request that still fits `requested` actors on the nodes.
        candidates = [usable[n] / k for n in usable for k in range(1, requested + 1) if usable[n] > 0]
        fitting = [c for c in candidates if sum(math.floor(usable[n] / c + 1e-9) for n in usable) >= requested]
        size = min(max(fitting, default=0.0), CPU_MODEL_ACTOR_MAX_CPUS)
    size = _round_down(size)
    if size < _SMALLEST_REQUEST:
        raise PoolPlacementError(f"no node has room for a model actor: nodes are {summary}, each keeping some CPU "
                                 "for read tasks and decode/write actors")
    placement = {n.node_id: {"model": 0} for n in nodes}
    left = requested
    for node in sorted(nodes, key=lambda n: -usable[n.node_id]):
        fits = math.floor(usable[node.node_id] / size + 1e-9)
        placed = fits if left is None else min(fits, left)
        placement[node.node_id]["model"] = placed
        if left is not None:
            left -= placed
    count = sum(p["model"] for p in placement.values())
    # torch threads: the cores of a host node shared among its model actors (side actors are light on CPU runs).
    shapes = {n.node_id: n for n in nodes}
    threads = max(1, min(int(shapes[node_id].cpus // p["model"]) for node_id, p in placement.items() if p["model"]))
    return count, size, threads, placement


def _side_pool_from_cost(cpus_needed: float, given: int | None) -> tuple[int, float]:
    """(actors, CPUs each) delivering `cpus_needed` CPU-seconds per second; single-threaded work, so at most one
    CPU per actor and more actors beyond that."""
    count = given if given is not None else max(1, math.ceil(cpus_needed - 1e-9))
    if count < 1:
        raise PoolPlacementError("--preprocess-actors and --postprocess-actors must be at least 1")
    return count, _round_down(min(1.0, max(SIDE_ACTOR_MIN_CPUS, cpus_needed / count)))


def _fit_side_pools(nodes: list[NodeShape], free: dict, wanted: dict,
                    fixed_counts: dict) -> tuple[tuple[int, float], tuple[int, float], dict] | None:
    """Shrinks the decode/write pools until they pack onto the free CPUs: fewer actors first (never below one,
    never for a size given on the command line), then smaller requests (down to `_SMALLEST_REQUEST`)."""
    counts = {stage: wanted[stage][0] for stage in wanted}
    requests = {stage: wanted[stage][1] for stage in wanted}
    while True:
        placement = _pack(nodes, free, counts, requests)
        if placement is not None:
            return ((counts["preprocess"], requests["preprocess"]), (counts["postprocess"], requests["postprocess"]),
                    placement)
        shrinkable = [stage for stage in counts if not fixed_counts[stage] and counts[stage] > 1]
        if shrinkable:
            counts[max(shrinkable, key=counts.get)] -= 1
        elif max(requests.values()) > _SMALLEST_REQUEST:
            requests = {stage: max(_SMALLEST_REQUEST, _round_down(cpus * 0.8)) for stage, cpus in requests.items()}
        else:
            return None


def _pack(nodes: list[NodeShape], free: dict, counts: dict, requests: dict) -> dict | None:
    """First fit, largest requests first, CPU-only nodes before GPU nodes: node id -> actors per stage."""
    room = dict(free)
    order = sorted(nodes, key=lambda n: (n.gpus > 0, -room[n.node_id]))
    placement = {n.node_id: {stage: 0 for stage in counts} for n in nodes}
    for stage in sorted(counts, key=lambda s: -requests[s]):
        for _ in range(counts[stage]):
            node = next((n for n in order if room[n.node_id] + 1e-9 >= requests[stage]), None)
            if node is None:
                return None
            room[node.node_id] -= requests[stage]
            placement[node.node_id][stage] += 1
    return placement


def _describe_nodes(nodes: list[NodeShape]) -> str:
    if not nodes:
        return "no alive nodes"
    counted: dict[str, int] = {}
    for node in sorted(nodes, key=lambda n: (not n.is_head, -n.gpus, -n.cpus)):  # the same text in any order
        counted[node.describe()] = counted.get(node.describe(), 0) + 1
    return "; ".join(f"{n} x {shape}" if n > 1 else shape for shape, n in counted.items())


def _round_down(cpus: float) -> float:
    """Three decimals, never more than asked (rounding up could push a request past a node's room)."""
    return math.floor(cpus * 1000 + 1e-6) / 1000
