"""Where bytes live: local paths, `file://`, `s3://` and any other fsspec URI, with the same options everywhere.

The one storage layer of every job (segment_bucket, finetune, evaluate, export_coco) and stage: the driver
resolves the storage options once (the `--storage-options` JSON on top of the standard AWS environment
variables) into a picklable `StorageConfig` that every stage, Ray worker and DataLoader worker receives as an
argument, so a worker on another machine reaches the bucket with the driver's settings instead of whatever its
own environment holds.

`--storage-options` holds s3fs keyword arguments: `{"endpoint_url": ..., "key": ..., "secret": ...}`. The form
older fsspec examples use, `{"client_kwargs": {"endpoint_url": ...}}`, means the same and is mapped onto
`endpoint_url` (a top-level value wins when both are given).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import fsspec

__all__ = ["StorageConfig", "join_uri", "is_local_uri", "protocol_of", "local_path"]

_LOCAL_PROTOCOLS = {"file", "local"}
_S3_PROTOCOLS = {"s3", "s3a"}
_SECRET_OPTION_NAMES = {"secret", "key", "token", "password", "aws_secret_access_key", "aws_access_key_id",
                        "aws_session_token", "session_token", "access_key", "secret_key"}


def protocol_of(uri: str) -> str:
    """'s3' for s3://bucket/key, 'file' for plain paths and file:// URIs."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def is_local_uri(uri: str) -> bool:
    return protocol_of(uri) in _LOCAL_PROTOCOLS


def local_path(uri: str) -> str:
    """A plain path for a local path or file:// URI."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join_uri(base: str, *parts: str) -> str:
    """Joins path parts onto a local path or a URI with '/' separators."""
    if is_local_uri(base) and "://" not in base:
        return str(Path(base, *parts))
    return posixpath.join(base.rstrip("/"), *parts)


def _s3_options_from_environment(environ: dict) -> dict:
    """The s3fs keyword arguments the standard AWS variables imply (botocore's own lookup misses the endpoint on
    older versions, and a worker's environment may differ from the driver's)."""
    options: dict = {}
    if environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = environ["AWS_ACCESS_KEY_ID"]
    if environ.get("AWS_SECRET_ACCESS_KEY"):
        options["secret"] = environ["AWS_SECRET_ACCESS_KEY"]
    if environ.get("AWS_SESSION_TOKEN"):
        options["token"] = environ["AWS_SESSION_TOKEN"]
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def _with_legacy_endpoint_mapped(options: dict) -> dict:
    """`{"client_kwargs": {"endpoint_url": X}}` (the older fsspec spelling) -> `{"endpoint_url": X}`."""
    client_kwargs = options.get("client_kwargs")
    if not isinstance(client_kwargs, dict) or "endpoint_url" not in client_kwargs:
        return options
    mapped = dict(options)
    rest = {k: v for k, v in client_kwargs.items() if k != "endpoint_url"}
    mapped.setdefault("endpoint_url", client_kwargs["endpoint_url"])
    if rest:
        mapped["client_kwargs"] = rest
    else:
        del mapped["client_kwargs"]
    return mapped


@dataclass(frozen=True)
class StorageConfig:
    """Filesystem options for every URI the job touches; picklable, so it travels to every Ray worker.

    `options` are fsspec keyword arguments for remote protocols (for s3: key, secret, token, endpoint_url,
    client_kwargs, ...); `s3_environment` holds what the AWS_* variables of the driver said.
    """

    options: dict = field(default_factory=dict)
    s3_environment: dict = field(default_factory=dict)

    @classmethod
    def resolve(cls, storage_options: dict | str | None = None, environ: dict | None = None) -> "StorageConfig":
        """Options from a dict or a JSON string, over the AWS variables of `environ` (default: os.environ)."""
        if isinstance(storage_options, str):
            try:
                storage_options = json.loads(storage_options) if storage_options.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"--storage-options is not valid JSON ({error}): {storage_options!r}; "
                                 'pass an object such as \'{"endpoint_url": "http://127.0.0.1:5000"}\'') from error
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ValueError(f"--storage-options must be a JSON object, got {type(storage_options).__name__}")
        environment = _s3_options_from_environment(dict(os.environ if environ is None else environ))
        return cls(options=_with_legacy_endpoint_mapped(dict(storage_options or {})), s3_environment=environment)

    @classmethod
    def coerce(cls, storage: "StorageConfig | dict | str | None") -> "StorageConfig":
        """A resolved config as is; explicit options (dict / JSON / None) resolved over os.environ."""
        if isinstance(storage, cls):
            return storage
        if isinstance(storage, dict) and set(storage) == {"options", "s3_environment"}:
            return cls(**storage)  # a config that travelled as `dataclasses.asdict` output
        return cls.resolve(storage)

    def fsspec_options(self, protocol: str) -> dict:
        if protocol in _LOCAL_PROTOCOLS:
            return {}
        if protocol in _S3_PROTOCOLS:
            merged = {**self.s3_environment, **self.options}
            if "client_kwargs" in self.s3_environment and "client_kwargs" in self.options:
                merged["client_kwargs"] = {**self.s3_environment["client_kwargs"], **self.options["client_kwargs"]}
            return merged
        return dict(self.options)

    def filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem for `uri` and the path inside it (no scheme)."""
        protocol = protocol_of(uri)
        options_json = json.dumps(self.fsspec_options(protocol), sort_keys=True, default=str)
        # The process id is part of the key: an s3fs instance used before a fork (DataLoader workers) fails after it.
        filesystem = _cached_filesystem(protocol, options_json, os.getpid())
        return filesystem, filesystem._strip_protocol(uri)

    def read_bytes(self, uri: str) -> bytes:
        filesystem, path = self.filesystem(uri)
        with filesystem.open(path, "rb") as handle:
            return handle.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Writes one file (a local file's folders are created)."""
        filesystem, path = self.filesystem(uri)
        if is_local_uri(uri):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with filesystem.open(path, "wb") as handle:
            handle.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def pyarrow_filesystem(self, uri: str):
        """(path, pyarrow filesystem) for APIs that take one (Ray Train's storage): None for local paths, which
        come back absolute; a remote URI goes through the same fsspec filesystem as everything else."""
        if is_local_uri(uri):
            return os.path.abspath(local_path(uri)), None
        import pyarrow.fs

        filesystem, path = self.filesystem(uri)
        return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))

    def redacted(self) -> dict:
        """The explicit options with credentials masked, for logs and report.json."""
        return _redact(self.options)

    def localize_directory(self, uri: str, cache_root: str | None = None) -> Path:
        """A local directory with the contents of `uri`: the path itself when local, else a cached download."""
        if is_local_uri(uri):
            filesystem, path = self.filesystem(uri)
            return Path(path)
        cache_root = cache_root or os.path.join(os.path.expanduser("~"), ".cache", "m2f", "checkpoints")
        target = Path(cache_root, hashlib.sha256(uri.encode()).hexdigest()[:16])
        complete_marker = target / ".complete"
        if complete_marker.exists():
            return target
        self.download_directory(uri, target)
        complete_marker.touch()
        return target

    def download_directory(self, uri: str, target: str | Path) -> Path:
        """Copies every file under the remote folder `uri` into the local folder `target`; each file appears
        complete or not at all (written under a partial name, then renamed)."""
        filesystem, path = self.filesystem(uri)
        if not filesystem.isdir(path):
            raise FileNotFoundError(f"{uri} does not exist or is not a folder")
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        for remote_file in filesystem.find(path):
            relative = posixpath.relpath(remote_file, path)
            local_file = target / relative
            local_file.parent.mkdir(parents=True, exist_ok=True)
            partial = local_file.with_name(local_file.name + f".part-{os.getpid()}")
            filesystem.get_file(remote_file, str(partial))
            os.replace(partial, local_file)
        return target


@lru_cache(maxsize=16)
def _cached_filesystem(protocol: str, options_json: str, process_id: int) -> fsspec.AbstractFileSystem:
    if protocol in _LOCAL_PROTOCOLS:
        return fsspec.filesystem("file")
    return fsspec.filesystem(protocol, **json.loads(options_json))


def _redact(value):
    if isinstance(value, dict):
        return {k: ("***" if k.lower() in _SECRET_OPTION_NAMES else _redact(v)) for k, v in value.items()}
    return value

