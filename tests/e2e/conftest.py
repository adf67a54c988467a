"""Session fixtures that start the real services end-to-end tests talk to, all on 127.0.0.1:
a Ray head (`ray start --head`, token auth, dashboard for `ray job submit`) and moto's S3 server.

One Ray head serves the whole session: starting one costs ~5 s and ~550 MiB on our 2-core machines.
The head gets no AWS variables on purpose: jobs must deliver S3 credentials themselves (runtime env
or --storage-options), as they would on a real cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from infra.local_stack import (RayHead, S3Endpoint, start_ray_head, start_s3_endpoint,  # noqa: E402
                               stop_ray_head, stop_s3_endpoint)

RAY_CLI = Path(sys.executable).parent / "ray"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> S3Endpoint:
    endpoint = start_s3_endpoint(log_dir=tmp_path_factory.mktemp("moto-server"))
    yield endpoint
    stop_s3_endpoint(endpoint)


@pytest.fixture(scope="session")
def ray_head() -> RayHead:
    head = start_ray_head(num_cpus=2, auth="token")
    yield head
    stop_ray_head(head, grace_s=5.0)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture
def s3_filesystem(s3_endpoint):
    """An s3fs filesystem on the test endpoint (fresh instance, no cached listings)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options())


@pytest.fixture
def s3_bucket(s3_filesystem) -> str:
    """A new empty bucket for one test; its name."""
    name = f"m2f-e2e-{uuid.uuid4().hex[:12]}"
    s3_filesystem.mkdir(name)
    return name


@dataclass
class SubmittedJob:
    returncode: int
    output: str  # the CLI's stdout+stderr: submission lines, then the job's own log tail
    job_id: str | None


@pytest.fixture(scope="session")
def submit_ray_job(ray_head):
    """Runs `ray job submit --working-dir DIR -- ENTRYPOINT...` against the session head and waits.

    env_vars go into the job's runtime env (they reach the driver and every worker); a job still
    running at timeout_s is stopped so it does not hold the cluster for the next test.
    """

    def submit(entrypoint: list[str], *, working_dir: Path = REPO_ROOT, env_vars: dict | None = None,
               timeout_s: float = 180.0, submission_id: str | None = None) -> SubmittedJob:
        submission_id = submission_id or f"m2f-e2e-{uuid.uuid4().hex[:10]}"
        # models/ stays behind: these jobs name their model, and the shipped one would be uploaded every time.
        runtime_env = {"env_vars": dict(env_vars or {}),
                       "excludes": [".git", ".venv", "**/__pycache__", "models/", "out/", "runs/"]}
        command = [str(RAY_CLI), "job", "submit", "--submission-id", submission_id,
                   "--working-dir", str(working_dir), "--runtime-env-json", json.dumps(runtime_env),
                   "--", *entrypoint]
        cli_env = {**os.environ, **ray_head.client_env()}
        try:
            done = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as timeout:
            subprocess.run([str(RAY_CLI), "job", "stop", submission_id], env=cli_env,
                           capture_output=True, timeout=60)
            partial = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part
                              for part in (timeout.stdout or "", timeout.stderr or ""))
            raise AssertionError(f"job {submission_id} still running after {timeout_s:.0f} s; "
                                 f"output so far:\n{partial[-6000:]}") from None
        return SubmittedJob(done.returncode, done.stdout + done.stderr, submission_id)

    return submit


# ----------------------------------------------------------------------------------------------
# Inputs of a labeling run: good images, bad files, a non-image object, and the model, in a bucket


@dataclass
class LabelingInputs:
    bucket: str
    images_uri: str  # s3://bucket/images/ (the job's --input)
    model_uri: str  # s3://bucket/models/tiny (the checkpoint, uploaded)
    model_dir: Path  # the same checkpoint, local
    good: dict  # image_uri -> (height, width)
    bad: dict  # image_uri -> what is wrong with it
    not_inputs: list  # objects in the folder the listing must skip (no image extension)
    image_bytes: dict  # image_uri -> encoded bytes, for every good and bad input

    @property
    def inputs(self) -> set:
        return set(self.good) | set(self.bad)


# (name, height, width): odd sizes, both orientations, JPEG and PNG, one grayscale.
_GOOD_IMAGES = [("a_street.jpg", 48, 64), ("b_tall.png", 72, 40), ("c_square.jpg", 56, 56),
                ("d_wide.png", 36, 90), ("e_gray.png", 50, 50), ("f_odd.jpg", 45, 67),
                ("g_small.jpg", 24, 32), ("h_photo.jpeg", 64, 48)]


def synthetic_image(height: int, width: int, seed: int, mode: str = "RGB"):
    """A few flat-colored rectangles and discs on a noisy background: something for masks to follow."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, size=(height, width, 3), dtype=np.uint8) + np.uint8(rng.integers(0, 150))
    rows, columns = np.mgrid[0:height, 0:width]
    for _ in range(3):
        color = rng.integers(0, 256, size=3, dtype=np.uint8)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        if rng.random() < 0.5:
            pixels[top:top + height // 3, left:left + width // 3] = color
        else:
            radius = max(3, min(height, width) // 5)
            pixels[(rows - top - radius) ** 2 + (columns - left - radius) ** 2 <= radius ** 2] = color
    image = Image.fromarray(pixels)
    return image.convert(mode) if mode != "RGB" else image


def encode_image(image, name: str) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if name.endswith((".jpg", ".jpeg")) else "PNG", quality=90)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width x height; its pixel data is a few bytes (a decompression bomb's
    shape, without the bomb)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def make_bad_files() -> dict:
    """name -> (bytes, what is wrong): every kind of input the job must turn into an error row."""
    valid_jpeg = encode_image(synthetic_image(64, 64, seed=99), "x.jpg")
    return {
        "bad_empty.jpg": (b"", "zero-byte object"),
        "bad_truncated.jpg": (valid_jpeg[: len(valid_jpeg) // 3], "JPEG cut after a third of its bytes"),
        "bad_text.jpg": (b"this is a text file, not a JPEG\n" * 8, "text with an image extension"),
        "bad_huge.png": (png_header_claiming(60_000, 60_000), "header claims 60000 x 60000 pixels"),
    }


def sharpen_random_checkpoint(source: Path, target: Path) -> Path:
    """A copy of a random-weight checkpoint whose outputs give every task something to label.

    Random weights leave all queries' masks nearly alike (mask logits ~0.05 apart) and the no-object
    class winning most queries, so panoptic post-processing keeps nothing. Suppressing the no-object
    logit, sharpening the class head and scaling the mask embeddings makes the queries disagree.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    weights["class_predictor.bias"][-1] -= 3.0
    weights["class_predictor.weight"] *= 8.0
    for name in ("weight", "bias"):
        weights[f"model.transformer_module.decoder.mask_predictor.mask_embedder.2.0.{name}"] *= 20.0
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="session")
def labeling_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return sharpen_random_checkpoint(Path(tiny_checkpoint), tmp_path_factory.mktemp("labeling-model") / "tiny")


@pytest.fixture(scope="session")
def encoded_test_image():
    """(height, width, seed, name) -> the encoded bytes of a synthetic image (JPEG or PNG by name)."""
    return lambda height, width, seed, name: encode_image(synthetic_image(height, width, seed), name)


@pytest.fixture(scope="session")
def labeling_inputs(s3_endpoint, labeling_checkpoint) -> LabelingInputs:
    import s3fs

    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options())
    bucket = f"m2f-e2e-inputs-{uuid.uuid4().hex[:8]}"
    filesystem.mkdir(bucket)
    good, bad, image_bytes = {}, {}, {}
    for seed, (name, height, width) in enumerate(_GOOD_IMAGES):
        mode = "L" if "gray" in name else "RGB"
        data = encode_image(synthetic_image(height, width, seed, mode), name)
        uri = f"s3://{bucket}/images/{name}"
        filesystem.pipe(uri, data)
        good[uri], image_bytes[uri] = (height, width), data
    for name, (data, problem) in make_bad_files().items():
        uri = f"s3://{bucket}/images/{name}"
        filesystem.pipe(uri, data)
        bad[uri], image_bytes[uri] = problem, data
    not_inputs = [f"s3://{bucket}/images/README.txt"]
    filesystem.pipe(not_inputs[0], b"labels for these images are written by the e2e test\n")
    filesystem.put(str(labeling_checkpoint) + "/", f"{bucket}/models/tiny/", recursive=True)
    return LabelingInputs(bucket=bucket, images_uri=f"s3://{bucket}/images/", model_uri=f"s3://{bucket}/models/tiny",
                          model_dir=Path(labeling_checkpoint), good=good, bad=bad, not_inputs=not_inputs,
                          image_bytes=image_bytes)
