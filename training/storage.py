"""Reading dataset files from a local folder or an object store (s3://...) through the pipeline's storage layer."""
from __future__ import annotations

import io
import json
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.storage import StorageConfig

__all__ = ["DatasetLocation", "open_location"]


class DatasetLocation:
    """A dataset root on some filesystem: joins relative paths, lists folders, reads JSON and images.

    Safe to fork and to pickle (DataLoader workers, Ray Train workers): it holds only the URI and the resolved
    `StorageConfig`, whose filesystem cache is per process.
    """

    def __init__(self, uri: str, storage: StorageConfig | dict | str | None = None) -> None:
        self.uri = str(uri)
        self.storage = StorageConfig.coerce(storage)
        _, root = self.storage.filesystem(self.uri)
        self.root = root.rstrip("/")

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        return self.storage.filesystem(self.uri)[0]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(part.strip("/") for part in parts if part)])

    def describe(self, path: str) -> str:
        """A path as the user would write it (with its protocol), for error messages."""
        protocol = self.filesystem.protocol
        protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    def exists(self, path: str) -> bool:
        return self.filesystem.exists(path)

    def files_under(self, folder: str) -> set[str]:
        """Every file below `folder`, as paths relative to it ('a/b.png'); empty when the folder is missing."""
        if not self.filesystem.isdir(folder):
            return set()
        prefix = folder.rstrip("/") + "/"
        return {path[len(prefix):] if path.startswith(prefix) else path
                for path in self.filesystem.find(folder)}

    def read_json(self, path: str) -> Any:
        if not self.exists(path):
            raise FileNotFoundError(f"{self.describe(path)} does not exist; see the expected folder layout in "
                                    f"training.load_coco_dataset's docstring.")
        with self.filesystem.open(path, "rb") as handle:
            try:
                return json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.describe(path)} is not valid JSON: {error}") from error

    def read_image(self, path: str, *, mode: str) -> np.ndarray:
        """Decodes the image at `path` converted to PIL `mode` ("RGB", or "I" / "L" for label maps)."""
        try:
            with self.filesystem.open(path, "rb") as handle:
                data = handle.read()
            with Image.open(io.BytesIO(data)) as image:
                if mode == "I" and image.mode in ("L", "P", "I;16", "I"):
                    return np.asarray(image, dtype=np.int32).copy()
                return np.asarray(image.convert(mode)).copy()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{self.describe(path)} does not exist (it is listed in the annotations).") \
                from error
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.describe(path)} could not be decoded as an image: {error}") from error


def open_location(root_or_uri: str, storage: StorageConfig | dict | str | None = None) -> DatasetLocation:
    """A `DatasetLocation` for a local path or a URI such as s3://bucket/prefix.

    `storage`: a resolved StorageConfig, or `--storage-options` (dict / JSON) resolved over the AWS_* variables.
    """
    return DatasetLocation(str(root_or_uri), storage)
