"""Reading dataset files from a local folder or an object store (s3://...) through fsspec."""
from __future__ import annotations

import io
import json
import os
from typing import Any

import fsspec
import numpy as np
from PIL import Image

__all__ = ["DatasetLocation", "open_location"]


class DatasetLocation:
    """A dataset root on some filesystem: joins relative paths, lists folders, reads JSON and images.

    Safe to fork and to pickle (DataLoader workers, Ray Train workers): the fsspec filesystem is rebuilt from the
    URI and storage options in every new process, because an s3fs instance used before a fork refuses to work
    after it ("This class is not fork-safe").
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        filesystem, root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.root = root.rstrip("/")
        self._filesystem: fsspec.AbstractFileSystem | None = filesystem
        self._filesystem_pid = os.getpid()

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        if self._filesystem is None or self._filesystem_pid != os.getpid():
            # fsspec clears its instance cache in a new process, so this is a fresh instance there.
            self._filesystem, _ = fsspec.core.url_to_fs(self.uri, **self.storage_options)
            self._filesystem_pid = os.getpid()
        return self._filesystem

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_filesystem"] = None
        return state

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


def open_location(root_or_uri: str, storage_options: dict[str, Any] | None = None) -> DatasetLocation:
    """A `DatasetLocation` for a local path or a URI such as s3://bucket/prefix (storage_options go to fsspec)."""
    return DatasetLocation(str(root_or_uri), storage_options)
