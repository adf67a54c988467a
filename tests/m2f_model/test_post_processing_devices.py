"""The post-processors on every available device (CPU always, CUDA when present), by the same code path:
every tensor they make is made on the logits' device, results stay there, and they agree with transformers'
post-processors given the same tensors on that device."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from m2f_model import post_processing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TARGET_SIZES = [(50, 70), (33, 41)]


def random_outputs(seed: int, device: str = "cpu", *, queries: int = 10, labels: int = 6) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(2, queries, labels + 1, generator=generator)
    chosen = torch.randint(0, labels, (2, queries), generator=generator)
    class_logits.scatter_add_(2, chosen[..., None], (torch.rand(2, queries, 1, generator=generator) < 0.5) * 6.0)
    coarse = torch.randn(2 * queries, 1, 6, 8, generator=generator)
    mask_logits = 3.0 * torch.nn.functional.interpolate(coarse, size=(24, 32), mode="bilinear").view(2, queries, 24, 32)
    return SimpleNamespace(class_queries_logits=class_logits.to(device), masks_queries_logits=mask_logits.to(device))


def every_call(outputs) -> dict:
    """Each post-processor in each of its output modes, with and without target sizes."""
    calls = {}
    for sizes_name, sizes in (("no-target", None), ("target", TARGET_SIZES)):
        calls[f"semantic-{sizes_name}"] = post_processing.post_process_semantic_segmentation(outputs, sizes)
        calls[f"instance-{sizes_name}"] = post_processing.post_process_instance_segmentation(
            outputs, threshold=0.3, target_sizes=sizes)
        calls[f"instance-binary-{sizes_name}"] = post_processing.post_process_instance_segmentation(
            outputs, threshold=0.3, target_sizes=sizes, return_binary_maps=True)
        calls[f"panoptic-{sizes_name}"] = post_processing.post_process_panoptic_segmentation(
            outputs, threshold=0.3, label_ids_to_fuse={1}, target_sizes=sizes)
        calls[f"tasks-{sizes_name}"] = post_processing.post_process_tasks(
            outputs, threshold=0.3, label_ids_to_fuse={1}, target_sizes=sizes)
    calls["instance-none-kept"] = post_processing.post_process_instance_segmentation(outputs, threshold=1.1)
    calls["panoptic-none-kept"] = post_processing.post_process_panoptic_segmentation(
        outputs, threshold=1.1, label_ids_to_fuse=set())
    return calls


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def test_no_tensor_is_made_on_the_default_device():
    # CUDA logits with a tensor made on the CPU fail with a device-mix error. The same defect shows on any
    # machine when the default device is `meta`: a tensor made without the logits' device lands there.
    outputs = random_outputs(0)
    torch.set_default_device("meta")
    try:
        results = every_call(outputs)
    finally:
        torch.set_default_device(None)
    assert all(t.device.type == "cpu" for t in tensors_in(list(results.values())))


@pytest.mark.parametrize("device", DEVICES)
def test_results_stay_on_the_logits_device(device):
    results = every_call(random_outputs(1, device))
    tensors = list(tensors_in(list(results.values())))
    assert tensors and all(t.device.type == device for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_post_processors_match_transformers_on_the_same_device(device, seed):
    transformers.logging.set_verbosity_error()
    reference = transformers.Mask2FormerImageProcessor()
    outputs = random_outputs(seed, device, queries=20)
    ours_semantic = post_processing.post_process_semantic_segmentation(outputs, TARGET_SIZES)
    theirs_semantic = reference.post_process_semantic_segmentation(outputs, target_sizes=TARGET_SIZES)
    assert all(torch.equal(a, b) for a, b in zip(ours_semantic, theirs_semantic))
    # transformers' default instance output builds its id map on the CPU; its binary maps work everywhere.
    ours = post_processing.post_process_instance_segmentation(outputs, threshold=0.3, target_sizes=TARGET_SIZES,
                                                               return_binary_maps=True)
    theirs = reference.post_process_instance_segmentation(outputs, threshold=0.3, target_sizes=TARGET_SIZES,
                                                          return_binary_maps=True)
    for a, b in zip(ours, theirs):
        assert a["segments_info"] == b["segments_info"]
        assert torch.equal(a["segmentation"], b["segmentation"].to(a["segmentation"].device))
    ours = post_processing.post_process_panoptic_segmentation(outputs, threshold=0.3, label_ids_to_fuse={1},
                                                               target_sizes=TARGET_SIZES)
    theirs = reference.post_process_panoptic_segmentation(outputs, threshold=0.3, label_ids_to_fuse={1},
                                                          target_sizes=TARGET_SIZES)
    for a, b in zip(ours, theirs):
        assert a["segments_info"] == b["segments_info"]
        assert torch.equal(a["segmentation"], b["segmentation"].to(a["segmentation"].device))
