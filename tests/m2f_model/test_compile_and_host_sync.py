"""The inference forward is ready for a GPU: one torch.compile graph (no graph breaks) and no host synchronisation.

On CPU these are the evidence for GPU speed: a graph break splits the compiled model (and rules out CUDA graphs), a
host synchronisation stalls the GPU's queue until every kernel before it has finished.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import m2f_model

# aten ops that wait for the device (a tensor value read on the host, or an output size known only from values) or
# copy Python data to the device (torch.tensor(...) of a list)
HOST_SYNCHRONISING_OPS = {
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.nonzero",
    "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim",
    "aten.unique_consecutive", "aten.lift_fresh",
}


class RecordedOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tiny_model(model_config_kwargs) -> m2f_model.Mask2FormerForUniversalSegmentation:
    torch.manual_seed(0)
    return m2f_model.Mask2FormerForUniversalSegmentation(m2f_model.Mask2FormerConfig(**model_config_kwargs())).eval()


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_inference_forward_compiles_to_one_graph_with_the_eager_outputs(tiny_model, mode):
    pixel_values = torch.randn(2, 3, 60, 76)  # window padding and shifted-window masks at every stage
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    try:
        with mode():
            expected = tiny_model(pixel_values)
            actual = compiled(pixel_values)
    finally:
        torch._dynamo.reset()

    assert torch.equal(actual.masks_queries_logits, expected.masks_queries_logits)
    assert torch.equal(actual.class_queries_logits, expected.class_queries_logits)


@pytest.mark.parametrize("training", [False, True])
def test_forward_never_synchronises_with_the_host(tiny_model, training):
    """Inference forward, and the training forward up to the loss (whose Hungarian matching runs on the host)."""
    pixel_values = torch.randn(2, 3, 60, 76)
    model = tiny_model.model.train(training)
    context = torch.enable_grad() if training else torch.inference_mode()
    with context:
        model(pixel_values)  # the first call of a shape builds its geometry (index tables) once
        with RecordedOps() as recorded:
            model(pixel_values)

    assert sum(recorded.calls.values()) > 100, "the dispatch mode saw no model ops"
    assert {op: n for op, n in recorded.calls.items() if op in HOST_SYNCHRONISING_OPS} == {}
