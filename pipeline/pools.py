"""Pool sizes and per-actor resources, derived from the cluster so one command fits a laptop and a GPU cluster.

Rules (each overridable by the CLI):
- read tasks ask for a quarter CPU each, and the actor pools together never reserve more than the cluster's
  CPUs minus a read reserve (at least half a CPU): pools that take every CPU starve the read tasks and Ray
  Data hangs without an error (ray-project/ray#44687);
- with GPUs: one model actor per GPU (`num_gpus=1`); without: one model actor per 8 CPUs, whose torch uses
  the CPUs its share of the cluster gives it;
- decode/preprocess and post-process actors: one each per model actor, more when CPUs are plentiful;
- CPU requests are fractional and scaled down together when they would exceed the budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["PoolPlan", "plan_pools"]

READ_TASK_CPUS = 0.25
_MIN_READ_RESERVE = 0.5


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

    @property
    def reserved_actor_cpus(self) -> float:
        return (self.preprocess_actors * self.preprocess_cpus + self.model_actors * self.model_cpus
                + self.postprocess_actors * self.postprocess_cpus)

    def as_dict(self) -> dict:
        return {**asdict(self), "reserved_actor_cpus": round(self.reserved_actor_cpus, 3)}


def plan_pools(cluster_resources: dict, *, preprocess_actors: int | None = None, model_actors: int | None = None,
               postprocess_actors: int | None = None, use_gpu: bool | None = None) -> PoolPlan:
    """A PoolPlan for a cluster described by `ray.cluster_resources()` (keys 'CPU', 'GPU')."""
    cpus = float(cluster_resources.get("CPU", 0.0))
    gpus = float(cluster_resources.get("GPU", 0.0))
    if cpus < 1:
        raise RuntimeError(f"the Ray cluster has {cpus} CPUs; the pipeline needs at least 1")
    with_gpu = gpus >= 1 if use_gpu is None else use_gpu
    if with_gpu and gpus < 1:
        raise RuntimeError("a GPU run was asked for but the Ray cluster has no GPU")

    if model_actors is None:
        model_actors = int(gpus) if with_gpu else max(1, int(cpus // 8))
    if with_gpu and model_actors > gpus:
        raise RuntimeError(f"--model-actors {model_actors} exceeds the cluster's {gpus:g} GPUs")
    budget = cpus - max(_MIN_READ_RESERVE, 0.1 * cpus)
    if preprocess_actors is None:
        # GPUs consume images far faster than one CPU decodes them; on CPU the model is the bottleneck.
        per_model = 4 if with_gpu else 1
        preprocess_actors = max(1, min(per_model * model_actors, int(budget // 2)))
    if postprocess_actors is None:
        per_model = 2 if with_gpu else 1
        postprocess_actors = max(1, min(per_model * model_actors, int(budget // 4)))

    wanted_model_cpus = 1.0 if with_gpu else max(1.0, min(8.0, cpus / model_actors) - 0.5)
    side_cpus = 1.0 if cpus >= 8 else 0.25
    wanted = {"model": model_actors * wanted_model_cpus, "pre": preprocess_actors * side_cpus,
              "post": postprocess_actors * side_cpus}
    scale = min(1.0, budget / sum(wanted.values()))
    model_cpus = _round_down(wanted_model_cpus * scale)
    side = _round_down(side_cpus * scale)
    threads = None if with_gpu else max(1, int(round(cpus / model_actors)))
    return PoolPlan(preprocess_actors=preprocess_actors, model_actors=model_actors,
                    postprocess_actors=postprocess_actors, preprocess_cpus=side, model_cpus=model_cpus,
                    model_gpus=1.0 if with_gpu else 0.0, postprocess_cpus=side, read_task_cpus=READ_TASK_CPUS,
                    model_torch_threads=threads, cluster_cpus=cpus, cluster_gpus=gpus)


def _round_down(cpus: float) -> float:
    """Three decimals, never more than asked (rounding up could push the pools past the budget)."""
    return math.floor(cpus * 1000) / 1000
