"""One storage interface for local paths, ``file://`` and ``s3://`` URIs.

Writes are atomic: locally a temp file in the same directory is renamed over the target; on
S3 an object only becomes visible when its single PUT or its multipart upload completes, so a
reader never sees half an object. Local files get the mode any tool would give them
(``0o666 & ~umask``: 0644 under umask 022), not the 0600 of the temp file they start as. S3 goes through boto3; Ray Data and Ray Train reach the same
buckets through a pyarrow filesystem. Both are built from one :class:`S3Settings`, resolved by
:func:`s3_settings` from :class:`rayimg.config.StorageConfig` and the standard AWS environment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

if TYPE_CHECKING:  # config imports nothing heavy, but keep storage importable on its own
    from rayimg.config import StorageConfig


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its full URI, size in bytes and a tag that changes when its content does
    (the ETag on S3; mtime_ns and size locally)."""

    uri: str
    size: int
    tag: str


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str | os.PathLike) -> Path:
    """The filesystem path of a local path or file:// URI."""
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        raise StorageError(f"{uri}: not a local path")
    return Path(text).expanduser()


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name (expected s3://bucket/key)")
    return bucket, key


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or URI with ``/``."""
    out = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out.rstrip("/") + "/" + part if out else part
    return out


def _check_scheme(uri: str) -> None:
    text = str(uri)
    if "://" in text and not text.startswith(("s3://", "file://")):
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")


class Storage:
    """Read, write, list and copy objects at local paths, file:// and s3:// URIs."""

    def __init__(self, config: "StorageConfig | None" = None):
        self.config = config
        self._client = None
        self._lock = threading.Lock()

    def __getstate__(self):
        # Ship the settings, not the client or lock: each process makes its own client.
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    # ------------------------------------------------------------------ S3 plumbing
    @property
    def s3(self):
        """The boto3 S3 client, created on first use (clients are thread-safe)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self):
        return s3_settings(self.config).boto3_client()

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        mb = self.config.multipart_threshold_mb if self.config else 64
        return TransferConfig(multipart_threshold=mb * 2**20, multipart_chunksize=max(mb, 8) * 2**20)

    def _s3_call(self, uri: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{uri}: no such object") from None
            if code == "NoSuchBucket":
                raise StorageError(f"{uri}: bucket does not exist") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"{uri}: access denied ({code})") from None
            raise StorageError(f"{uri}: S3 error {code}: {e}") from None
        except BotoCoreError as e:
            raise StorageError(f"{uri}: cannot reach S3: {e}") from None

    # ------------------------------------------------------------------ single objects
    def exists(self, uri: str) -> bool:
        """True if an object (or, locally, a file or directory) is at ``uri``."""
        _check_scheme(uri)
        if not is_s3(uri):
            return local_path(uri).exists()
        bucket, key = split_s3(uri)
        try:
            self._s3_call(uri, self.s3.head_object, Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            return False

    def read_bytes(self, uri: str) -> bytes:
        _check_scheme(uri)
        if not is_s3(uri):
            path = local_path(uri)
            if not path.is_file():
                raise FileNotFoundError(f"{uri}: no such file")
            return path.read_bytes()
        bucket, key = split_s3(uri)
        resp = self._s3_call(uri, self.s3.get_object, Bucket=bucket, Key=key)
        return resp["Body"].read()

    def read_head(self, uri: str, n: int) -> bytes:
        """The first ``n`` bytes at ``uri`` (all of it when shorter), without reading the rest: a
        ranged GET on S3."""
        _check_scheme(uri)
        if not is_s3(uri):
            path = local_path(uri)
            if not path.is_file():
                raise FileNotFoundError(f"{uri}: no such file")
            with open(path, "rb") as f:
                return f.read(n)
        if n <= 0:
            return b""
        bucket, key = split_s3(uri)
        resp = self._s3_call(uri, self.s3.get_object, Bucket=bucket, Key=key, Range=f"bytes=0-{n - 1}")
        return resp["Body"].read()[:n]

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` atomically: readers see the old object or the whole new one."""
        _check_scheme(uri)
        if not is_s3(uri):
            _atomic_write_local(local_path(uri), data)
            return
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{uri}: not an object key")
        self._s3_call(uri, self.s3.put_object, Bucket=bucket, Key=key, Body=data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def upload_file(self, local: str | os.PathLike, uri: str) -> None:
        """Copy a local file to ``uri`` atomically (multipart on S3 above the threshold)."""
        _check_scheme(uri)
        src = Path(local)
        if not is_s3(uri):
            dst = local_path(uri)
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                os.chmod(tmp, file_mode())
                os.replace(tmp, dst)
            except BaseException:
                _unlink(tmp)
                raise
            return
        bucket, key = split_s3(uri)
        # A multipart upload that fails is aborted by boto3, so nothing partial becomes visible.
        self._s3_call(uri, self.s3.upload_file, str(src), bucket, key, Config=self._transfer_config())

    def download_file(self, uri: str, local: str | os.PathLike) -> Path:
        """Copy one object to a local file (atomically: temp + rename)."""
        _check_scheme(uri)
        dst = Path(local)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        os.close(fd)
        try:
            if is_s3(uri):
                bucket, key = split_s3(uri)
                self._s3_call(uri, self.s3.download_file, bucket, key, tmp, Config=self._transfer_config())
            else:
                src = local_path(uri)
                if not src.is_file():
                    raise FileNotFoundError(f"{uri}: no such file")
                shutil.copyfile(src, tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, dst)
        except BaseException:
            _unlink(tmp)
            raise
        return dst

    def delete(self, uri: str) -> None:
        """Delete one object; a missing one is not an error."""
        _check_scheme(uri)
        if not is_s3(uri):
            path = local_path(uri)
            if path.is_file() or path.is_symlink():
                path.unlink()
            return
        bucket, key = split_s3(uri)
        self._s3_call(uri, self.s3.delete_object, Bucket=bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many."""
        infos = self.list(prefix)
        if not is_s3(prefix):
            path = local_path(prefix)
            if path.is_dir():
                shutil.rmtree(path)
            return len(infos)
        for uri in infos:
            self.delete(uri)
        return len(infos)

    def remove_partial_writes(self, prefix: str) -> int:
        """Delete the temporary files that atomic writes killed mid-way left under a local
        ``prefix`` (``.<name>.<random>.tmp``); returns how many. Call it only when no writer is
        running under ``prefix``. S3 uploads are atomic and leave nothing behind."""
        _check_scheme(prefix)
        root = local_path(prefix) if not is_s3(prefix) else None
        if root is None or not root.is_dir():
            return 0
        stale = [Path(d) / n for d, _dirs, files in os.walk(root) for n in files if n.startswith(".") and n.endswith(".tmp")]
        for path in stale:
            _unlink(str(path))
        return len(stale)

    # ------------------------------------------------------------------ prefixes
    def list_info(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursive), sorted by URI.

        A prefix names a directory: ``s3://b/data`` lists ``s3://b/data/...``, not ``s3://b/database``.
        Temp files of in-flight local atomic writes are left out.
        """
        _check_scheme(prefix)
        if not is_s3(prefix):
            root = local_path(prefix)
            if root.is_file():
                st = root.stat()
                return [ObjectInfo(str(prefix), st.st_size, f"{st.st_mtime_ns}-{st.st_size}")]
            if not root.is_dir():
                return []
            out = []
            base = str(prefix).rstrip("/")
            for path in sorted(_walk_files(root)):
                rel = path.relative_to(root).as_posix()
                st = path.stat()
                out.append(ObjectInfo(f"{base}/{rel}", st.st_size, f"{st.st_mtime_ns}-{st.st_size}"))
            return out
        bucket, key = split_s3(prefix)
        key_prefix = key.rstrip("/") + "/" if key else ""
        out = []
        paginator = self.s3.get_paginator("list_objects_v2")
        pages = self._s3_call(prefix, lambda: list(paginator.paginate(Bucket=bucket, Prefix=key_prefix)))
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # "directory" marker objects made by some tools
                out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), obj["ETag"].strip('"')))
        out.sort(key=lambda o: o.uri)
        return out

    def list(self, prefix: str) -> list[str]:
        """URIs of every object under ``prefix`` (recursive), sorted."""
        return [o.uri for o in self.list_info(prefix)]

    def download_prefix(self, prefix: str, local_dir: str | os.PathLike) -> Path:
        """Mirror every object under ``prefix`` into ``local_dir`` (relative layout kept)."""
        infos = self.list_info(prefix)
        if not infos:
            raise FileNotFoundError(f"{prefix}: no objects under this prefix")
        dst_root = Path(local_dir)
        base = prefix.rstrip("/") + "/"
        for info in infos:
            rel = info.uri[len(base):] if info.uri.startswith(base) else Path(info.uri).name
            _check_relative(rel, info.uri)
            self.download_file(info.uri, dst_root / rel)
        return dst_root

    def upload_dir(self, local_dir: str | os.PathLike, prefix: str) -> list[str]:
        """Copy every file under ``local_dir`` to ``prefix``; returns the URIs written."""
        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory")
        written = []
        for path in sorted(_walk_files(root)):
            uri = join(prefix, path.relative_to(root).as_posix())
            self.upload_file(path, uri)
            written.append(uri)
        return written


S3_ATTEMPTS = 5  # tries per S3 request (standard retry mode), for boto3 and pyarrow alike


@dataclass(frozen=True)
class S3Settings:
    """How every S3 client of a job reaches storage: the boto3 client of :class:`Storage` and the
    pyarrow filesystem of Ray Data and Ray Train checkpoints are both built from one of these,
    so they cannot drift apart. Make one with :func:`s3_settings`.

    ``access_key``/``secret_key``/``session_token`` are set when the credentials are static or
    come from a named profile (pyarrow cannot read a profile itself); they are None for
    credentials that expire and refresh (instance roles, SSO), which each client then resolves
    and refreshes through the standard AWS chain.
    """

    endpoint_url: str | None
    region: str
    addressing_style: Literal["path", "virtual"]
    profile: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def boto3_client(self):
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(profile_name=self.profile, aws_access_key_id=self.access_key,
                                        aws_secret_access_key=self.secret_key, aws_session_token=self.session_token)
        config = Config(s3={"addressing_style": self.addressing_style}, retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
                        max_pool_connections=32)
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def arrow_filesystem(self):
        from pyarrow import fs

        endpoint = self.endpoint_url
        if endpoint is None and self.addressing_style == "path":
            endpoint = f"https://s3.{self.region}.amazonaws.com"  # pyarrow addresses by path only with an explicit endpoint
        kwargs = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        if self.access_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key, session_token=self.session_token)
        return fs.S3FileSystem(region=self.region, force_virtual_addressing=self.addressing_style == "virtual",
                               retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS), **kwargs)


def s3_settings(config: "StorageConfig | None") -> S3Settings:
    """The S3 settings of a job, each from its ``storage`` section when set, else the standard
    AWS environment: endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's
    ``endpoint_url``; none means AWS S3), region (AWS_REGION, AWS_DEFAULT_REGION, the profile's
    ``region``, else us-east-1), profile (AWS_PROFILE, else the default chain) and credentials
    (the profile's, or the standard chain's). Addressing ``auto`` is path-style for an explicit
    endpoint (self-hosted stores rarely resolve bucket host names) and virtual-hosted on AWS."""
    import botocore.session
    from botocore.credentials import RefreshableCredentials

    profile = (config.profile if config else None) or os.environ.get("AWS_PROFILE") or None
    session = botocore.session.Session(profile=profile)
    endpoint = ((config.endpoint_url if config else None) or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or session.get_scoped_config().get("endpoint_url"))
    region = ((config.region if config else None) or os.environ.get("AWS_REGION") or session.get_config_variable("region")
              or "us-east-1")
    style = config.addressing_style if config else "auto"
    if style == "auto":
        style = "path" if endpoint else "virtual"
    keys = {}
    credentials = session.get_credentials()
    if credentials is not None and (profile or not isinstance(credentials, RefreshableCredentials)):
        frozen = credentials.get_frozen_credentials()
        keys = dict(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
    return S3Settings(endpoint_url=endpoint, region=region, addressing_style=style, profile=profile, **keys)


def arrow_filesystem(config: "StorageConfig | None", uri: str):
    """(pyarrow filesystem or None, path) for Ray Data readers and Ray Train storage: the same
    endpoint, region, addressing style and credentials as :class:`Storage` (:func:`s3_settings`)."""
    if not is_s3(uri):
        return None, str(local_path(uri))
    return s3_settings(config).arrow_filesystem(), uri[len("s3://"):]


def content_hash(infos: list[ObjectInfo]) -> str:
    """A hash of a listing (relative names, sizes, tags): changes when any object changes."""
    h = hashlib.sha256()
    for info in infos:
        h.update(f"{info.uri}\0{info.size}\0{info.tag}\n".encode())
    return h.hexdigest()


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # an atomic write in flight
            yield Path(dirpath) / name


def _check_relative(rel: str, uri: str) -> None:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts:
        raise StorageError(f"{uri}: refusing to write outside the target directory")


def _umask_at_import() -> int:
    # os.umask can only be read by setting it; done once, before any thread of ours writes files.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


_UMASK_LOCK = threading.Lock()
_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux 4.7+);
    elsewhere the umask the process had when this module was imported."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def file_mode() -> int:
    """The mode a newly created file gets from ``open()``: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a newly created directory gets from ``mkdir``: ``0o777`` less the umask (a
    ``tempfile.mkdtemp`` directory starts as 0700)."""
    return 0o777 & ~current_umask()


def normalize_modes(root: str | os.PathLike) -> None:
    """Give a local folder written by another library (``save_pretrained``, ``save_file``: some
    write through 0600 temp files, ``mkdtemp`` folders are 0700) the umask's modes, as if every
    file and folder in it had been made by ``open`` and ``mkdir``."""
    files, dirs = file_mode(), dir_mode()
    root = Path(root)
    os.chmod(root, dirs)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dirs if path.is_dir() else files)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _atomic_write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
