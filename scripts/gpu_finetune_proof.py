"""Fine-tuning proven end to end on a GPU (issue 8), as one command; with --tiny it runs on a CPU in minutes.

    # on the GPU machine (see ../shared/reference/gpu-facts.md for .gpu/):
    bash .gpu/install.sh && export PYTHONPATH=/tmp/site:$PWD && python scripts/gpu_finetune_proof.py --out $OUT
    # anywhere, small and on the CPU: the same steps
    python scripts/gpu_finetune_proof.py --out /tmp/proof --tiny

Steps, each appended to OUT/results.jsonl when it ends (a run cut short keeps what it reached) with its log in
OUT/<step>.log:
  autocast_tests  tests/m2f_model/test_autocast_backward.py on this machine (CUDA cases where there is a GPU)
  dataset         jobs/make_shapes_dataset.py
  checkpoint      a Mask2Former built and saved by transformers (random weights, transformers' layout)
  finetune        jobs/finetune.py from that checkpoint, bf16 autocast on the GPU, checkpoints every
                  --checkpoint-every steps; once the second checkpoint exists one Ray Train worker process is
                  killed (SIGKILL; found among this run's own descendants) and the run must restart from the
                  last checkpoint and finish; the loss must fall
  export          the exported model loads in transformers and gives our logits
  evaluate        jobs/evaluate.py scores the export on the val split (PQ, mask AP, mIoU)
  shared_gpu      two Ray Train workers on one GPU (--gpus-per-worker 0.5); skipped without a GPU
  train_step      benchmarks/train_step.py, Swin-T 1024x1024 bf16, ours vs transformers; GPU only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class Proof:
    """Runs the steps and records each one's outcome as a JSON line."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.results = out / "results.jsonl"

    def record(self, step: str, ok: bool | None, **details) -> None:
        """ok None: skipped."""
        row = {"step": step, "ok": ok, **details}
        with self.results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        verdict = {True: "ok", False: "FAILED", None: "skipped"}[ok]
        print(f"[proof] {step}: {verdict} {json.dumps(details)[:600]}", flush=True)

    def run(self, step: str, command: list[str], *, timeout: float, watch=None) -> tuple[int, str, float]:
        """Runs `command` from the repository root, its output into OUT/<step>.log; `watch(process)` is called
        every second while it runs. Returns (exit code, output, seconds)."""
        log_path = self.out / f"{step}.log"
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            part for part in (os.environ.get("PYTHONPATH"), str(REPO_ROOT)) if part))
        started = time.time()
        with log_path.open("w") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env=environment, start_new_session=True)
            while process.poll() is None:
                if time.time() - started > timeout:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    break
                if watch is not None:
                    watch(process)
                time.sleep(1)
        return process.returncode, log_path.read_text(), time.time() - started


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def build_checkpoint(directory: Path, *, tiny: bool, image_size: int) -> dict:
    """A transformers-built Mask2Former for the shapes labels, saved by transformers with its processor."""
    import torch
    import transformers

    from training.shapes import SHAPES_CATEGORIES

    torch.manual_seed(0)
    if tiny:
        backbone = transformers.SwinConfig(image_size=image_size, embed_dim=16, depths=[1, 1, 2, 1],
                                           num_heads=[1, 2, 2, 4], window_size=4,
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
        sizes = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
                     dim_feedforward=64, encoder_layers=2, decoder_layers=3, num_attention_heads=2, num_queries=8,
                     train_num_points=256)
    else:  # Swin-T widths, as the COCO checkpoints; fewer queries for a five-label dataset
        backbone = transformers.SwinConfig(image_size=image_size, embed_dim=96, depths=[2, 2, 6, 2],
                                           num_heads=[3, 6, 12, 24], window_size=7,
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
        sizes = dict(num_queries=20, train_num_points=4096)
    id2label = {label: category["name"] for label, category in enumerate(SHAPES_CATEGORIES)}
    config = transformers.Mask2FormerConfig(backbone_config=backbone, id2label=id2label,
                                            label2id={v: k for k, v in id2label.items()}, **sizes)
    model = transformers.Mask2FormerForUniversalSegmentation(config)
    model.save_pretrained(directory)
    processor = transformers.Mask2FormerImageProcessor(size={"height": image_size, "width": image_size},
                                                       ignore_index=255, num_labels=len(id2label),
                                                       do_reduce_labels=False)
    processor.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters()), "transformers": transformers.__version__}


def logits_against_transformers(model_directory: Path, image_path: Path, device: str) -> dict:
    """Our model and transformers' on one image of the export: max |diff| of the logits (float32, eval)."""
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    image = np.asarray(Image.open(image_path).convert("RGB"))
    pixel_values = Mask2FormerImageProcessor.from_pretrained(model_directory)(
        images=[image], return_tensors="pt")["pixel_values"].to(device)
    theirs = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(model_directory).to(device).eval()
    ours = Mask2FormerForUniversalSegmentation.from_pretrained(model_directory).to(device).eval()
    with torch.no_grad():
        expected, actual = theirs(pixel_values=pixel_values), ours(pixel_values=pixel_values)
    return {"max_abs_diff_class_logits": float((expected.class_queries_logits
                                                 - actual.class_queries_logits).abs().max()),
            "max_abs_diff_mask_logits": float((expected.masks_queries_logits
                                                - actual.masks_queries_logits).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu-proof"))
    parser.add_argument("--tiny", action="store_true", help="tiny model, 64x64 images, few steps (CPU-sized)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 200, --tiny 12)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="default 50, --tiny 4")
    parser.add_argument("--batch-size", type=int, default=None, help="per worker (default 8, --tiny 2)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    arguments = parser.parse_args()

    import torch

    sys.path.insert(0, str(REPO_ROOT))
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    tiny = arguments.tiny
    steps = arguments.steps or (12 if tiny else 200)
    every = arguments.checkpoint_every or (4 if tiny else 50)
    batch = arguments.batch_size or (2 if tiny else 8)
    image_size = 64 if tiny else 128
    skip = set(filter(None, arguments.skip.split(",")))
    out = Path(arguments.out).resolve()
    proof = Proof(out)
    python = sys.executable
    proof.record("machine", True, device=torch.cuda.get_device_name(0) if gpu else "cpu", torch=torch.__version__,
                 cpus=os.cpu_count(), steps=steps, checkpoint_every=every, batch_size=batch, tiny=tiny)

    if "autocast_tests" not in skip:
        code, output, seconds = proof.run("autocast_tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                             "tests/m2f_model/test_autocast_backward.py"],
                                          timeout=600)
        summary = output.strip().splitlines()[-1] if output.strip() else ""
        proof.record("autocast_tests", code == 0, summary=summary, cuda_cases=gpu, seconds=round(seconds, 1))

    data = out / "shapes"
    code, output, seconds = proof.run("dataset", [python, "jobs/make_shapes_dataset.py", "--output", str(data),
                                                  "--train", str(64 if tiny else 512), "--val", str(8 if tiny else 32),
                                                  "--seed", "1", "--image-size", str(image_size)], timeout=600)
    proof.record("dataset", code == 0, seconds=round(seconds, 1))

    checkpoint = out / "init-transformers"
    details = build_checkpoint(checkpoint, tiny=tiny, image_size=image_size)
    proof.record("checkpoint", True, path=str(checkpoint), **details)

    storage, name, model = out / "runs", "proof", out / "model"
    killed: dict = {}

    seen: dict = {}

    def kill_a_worker_after_second_checkpoint(process: subprocess.Popen) -> None:
        if killed or not (storage / name / f"checkpoint_{2 * every:07d}" / "model.safetensors").exists():
            return
        # a few seconds for Ray Train to register the checkpoint it is writing
        if time.time() - seen.setdefault("checkpoint", time.time()) < 5:
            return
        workers = [pid for pid in descendants(process.pid) if command_line(pid).startswith("ray::RayTrainWorker")]
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            killed.update(pid=workers[0], after_checkpoint=2 * every, seconds_into_run=round(time.time() - started))

    finetune = [python, "jobs/finetune.py", "--data", str(data), "--init-from", str(checkpoint), "--num-workers", "1",
                "--batch-size", str(batch), "--max-steps", str(steps), "--checkpoint-every", str(every),
                "--warmup-steps", str(max(1, steps // 20)), "--lr", "1e-4", "--storage-path", str(storage),
                "--name", name, "--output-model", str(model), "--max-failures", "2"]
    if gpu:
        finetune.append("--use-gpu")
    started = time.time()
    code, output, seconds = proof.run("finetune", finetune, timeout=1800,
                                      watch=kill_a_worker_after_second_checkpoint)
    history = json.loads((model / "history.json").read_text()) if (model / "history.json").is_file() else []
    losses = [row["loss"] for row in history]
    window = max(1, min(10, len(losses) // 4))
    first, last = (sum(losses[:window]) / window, sum(losses[-window:]) / window) if losses else (None, None)
    restarted_at = [int(match) for match in re.findall(r"\[finetune\] step (\d+)/", output)]
    proof.record("finetune", code == 0 and bool(killed) and "restart 1 of" in output
                 and [row["step"] for row in history] == list(range(1, steps + 1)) and last < first,
                 exit_code=code, seconds=round(seconds, 1), killed=killed, restarted="restart 1 of" in output,
                 first_steps_printed=restarted_at[:6], loss_first=first, loss_last=last,
                 steps_in_history=len(history), mixed_precision=gpu,
                 seconds_per_step_last=(history[-1]["seconds"] - history[-2]["seconds"]) if len(history) > 1 else None)

    if (model / "model.safetensors").is_file():
        try:
            difference = logits_against_transformers(model, sorted((data / "val").glob("*.png"))[0], device)
            proof.record("export", max(difference.values()) < (1e-2 if gpu else 1e-3), **difference)
        except Exception as error:  # recorded, and the remaining steps still run
            proof.record("export", False, error=f"{type(error).__name__}: {error}")
        code, output, seconds = proof.run("evaluate", [python, "jobs/evaluate.py", "--model", str(model), "--data",
                                                       str(data), "--split", "val", "--device", device, "--json",
                                                       str(out / "evaluation.json")], timeout=600)
        scores = json.loads((out / "evaluation.json").read_text()) if (out / "evaluation.json").is_file() else {}
        proof.record("evaluate", code == 0, seconds=round(seconds, 1), images=scores.get("images"),
                     panoptic=scores.get("panoptic", {}).get("all"),
                     mask_ap=scores.get("instance", {}).get("ap"), miou=scores.get("semantic", {}).get("miou"))

    if "shared_gpu" not in skip:
        if gpu:
            shared = [python, "jobs/finetune.py", "--data", str(data), "--init-from", str(checkpoint),
                      "--num-workers", "2", "--use-gpu", "--gpus-per-worker", "0.5", "--batch-size", str(batch),
                      "--max-steps", "20", "--checkpoint-every", "20", "--storage-path", str(storage),
                      "--name", "shared-gpu", "--max-failures", "0"]
            code, output, seconds = proof.run("shared_gpu", shared, timeout=900)
            proof.record("shared_gpu", code == 0, exit_code=code, seconds=round(seconds, 1),
                         final=next((line for line in output.splitlines() if line.startswith("final metrics")), None))
        else:
            proof.record("shared_gpu", None, reason="no GPU on this machine")

    if "train_step" not in skip and gpu:
        for batch_size in (4, 8):
            code, output, seconds = proof.run(f"train_step_b{batch_size}", [
                python, "benchmarks/train_step.py", "--device", "cuda", "--dtype", "bfloat16", "--model",
                "swin-t-coco", "--size", "1024", "--batch-size", str(batch_size), "--steps", "10", "--warmup", "2",
                "--json", str(out / f"train_step_b{batch_size}.json")], timeout=600)
            figures = (json.loads((out / f"train_step_b{batch_size}.json").read_text())
                       if (out / f"train_step_b{batch_size}.json").is_file() else {})
            proof.record(f"train_step_b{batch_size}", code == 0, seconds=round(seconds, 1), **figures)


if __name__ == "__main__":
    main()
