"""Backends: plain blob storage, no model logic. A local folder (the embedded default) and
S3-compatible object storage through boto3, behind one small interface (`Backend`)."""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from spottune.errors import StoreError
from spottune.settings import StoreSettings
from spottune.store.errors import ObjectMissing, StoreMisconfigured, WriteConflict
from spottune.store.hashing import CHUNK, file_chunks, sha256_bytes


class Backend(Protocol):
    """The few blob operations the store needs. Keys are '/'-separated; `url` names one in messages."""

    def url(self, key: str) -> str: ...

    def check(self) -> None:
        """Fail early, with a clear StoreError, when the storage is unreachable or misconfigured."""

    def put_file(self, key: str, src: Path, sha256: str) -> None:
        """Upload a file (replacing any object at key)."""

    def put_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False) -> str:
        """Write data; with if_match/if_absent raise WriteConflict unless the condition holds. Returns the new tag."""

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """Data and its tag (for if_match), or None when the key does not exist."""

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """Stream an object; raises ObjectMissing."""

    def list_sizes(self, prefix: str) -> dict[str, int]:
        """Every key under prefix, with its size in bytes."""


def _check_key(key: str) -> str:
    """Keys are built from validated names; refuse anything that could climb out of the store."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise StoreError(f"invalid store key {key!r}")
    return key


class LocalBackend:
    """A folder. Writes go to a unique temporary name, are fsynced and renamed, so readers see whole files.

    A per-process temporary name (as in spottune.atomic.atomic_write) is not enough here: two
    threads promoting at once would share it. Create-if-absent links the temporary file to its name
    (link fails when the name exists); compare-and-swap takes an flock on one lock file per key
    (only the production pointers), which serialises threads and processes on one machine, not
    across NFS clients.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreMisconfigured(f"cannot create the local store {self.root}: {e.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreMisconfigured(f"the local store {self.root} is not writable")

    def _write_atomic(self, path: Path, write: Callable[[Any], None], *, exclusive: bool = False) -> None:
        """Write to a unique temporary file, fsync, then rename over path (or, exclusive, link it:
        link fails if path exists, which makes create-if-absent atomic without a lock)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a store file is as open() would make it
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise WriteConflict(f"{path} already exists") from None
            else:
                os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_file(self, key: str, src: Path, sha256: str) -> None:
        def copy(f: Any) -> None:
            for chunk in file_chunks(src):
                f.write(chunk)

        self._write_atomic(self._path(key), copy)

    def put_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False) -> str:
        path = self._path(key)
        if if_match is None:
            self._write_atomic(path, lambda f: f.write(data), exclusive=if_absent)
            return sha256_bytes(data)
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{sha256_bytes(key.encode())}.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = path.read_bytes() if path.is_file() else None
                if current is None or sha256_bytes(current) != if_match:
                    raise WriteConflict(f"{self.url(key)} changed since it was read")
                self._write_atomic(path, lambda f: f.write(data))
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return sha256_bytes(data)

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data, sha256_bytes(data)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the `with` below, once it is known to exist
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url(key)} does not exist") from None
        with f:
            while chunk := f.read(CHUNK):
                yield chunk

    def list_sizes(self, prefix: str) -> dict[str, int]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return {}
        out: dict[str, int] = {}
        for p in base.rglob("*"):
            rel = p.relative_to(self.root).as_posix()
            if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
                out[rel] = p.stat().st_size
        return out


def current_umask() -> int:
    """This process's umask, read without changing it (Linux's /proc/self/status; else set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class S3Backend:
    """S3-compatible object storage through boto3 (imported here only, so the CLI starts without it).

    Credentials come from boto3's standard chain and nothing else. Large files go up in parts
    (TransferConfig); botocore's standard retry mode retries throttling and connection errors with
    backoff. Every botocore error is turned into a StoreError that names the bucket and key.
    """

    def __init__(self, settings: StoreSettings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        assert settings.s3_bucket is not None  # StoreSettings refuses s3 without a bucket
        self.bucket = settings.s3_bucket
        self.endpoint = settings.s3_endpoint_url or "AWS S3"
        config = Config(
            region_name=s3_region(settings),
            # total_max_attempts counts the first request; botocore's max_attempts would count retries only.
            retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        )
        try:
            self.client = boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
        except ValueError:  # botocore's "Invalid endpoint: <the whole URL>": never repeat what may hold a secret
            from spottune.endpoints import shown_endpoint

            raise StoreMisconfigured(f"cannot use the S3 endpoint {shown_endpoint(settings.s3_endpoint_url)} with region "
                                     f"{settings.s3_region!r}: botocore refused it as malformed") from None
        # Multipart uploads this backend started and has not seen finish: an upload cut off by an outage
        # leaves its parts stored (and billed) until aborted, and s3transfer's own abort fails when the
        # endpoint is down at that moment. They are aborted, best effort, when the upload fails and again
        # before the next upload (a retry), so a publish that ends well leaves no orphan parts.
        self._open_uploads: dict[str, str] = {}  # upload id -> key
        self._uploads_lock = threading.Lock()
        self.client.meta.events.register("after-call.s3.CreateMultipartUpload", self._upload_started)
        mb = 1024 * 1024
        self.transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold_mb * mb,
            multipart_chunksize=settings.s3_multipart_chunksize_mb * mb,
            max_concurrency=4,
        )

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _error(self, e: Exception, key: str | None, action: str) -> StoreError:
        """One clear sentence for the failures a user can fix; never a botocore traceback."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self.url(key) if key else f"bucket {self.bucket!r}"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreMisconfigured(f"cannot {action} {where}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role)")
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
            return StoreError(f"cannot {action} {where}: endpoint {self.endpoint} is unreachable ({type(e).__name__})")
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return WriteConflict(f"{where} changed since it was read ({code or status})")
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and key is None):
                return StoreMisconfigured(f"cannot {action} {where}: bucket {self.bucket!r} does not exist at {self.endpoint}")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectMissing(f"{where} does not exist")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                return StoreMisconfigured(f"cannot {action} {where}: access denied ({code}) at {self.endpoint}; check the "
                                  "credentials in boto3's standard chain and the bucket policy")
            return StoreError(f"cannot {action} {where}: {code or status}: {e.response.get('Error', {}).get('Message', '')}")
        if isinstance(e, S3UploadFailedError):
            return StoreError(f"cannot {action} {where}: {e}")
        return StoreError(f"cannot {action} {where}: {type(e).__name__}: {e}")

    def _call(self, action: str, key: str | None, fn: Callable[[], Any]) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(e, key, action) from None

    def check(self) -> None:
        self._call("reach", None, lambda: self.client.head_bucket(Bucket=self.bucket))

    def _upload_started(self, parsed: dict[str, Any] | None = None, **_: Any) -> None:
        if parsed and parsed.get("UploadId") and parsed.get("Key"):
            with self._uploads_lock:
                self._open_uploads[str(parsed["UploadId"])] = str(parsed["Key"])

    def abort_open_uploads(self) -> list[str]:
        """Abort every multipart upload this backend started that did not finish; best effort (an endpoint
        still down keeps them for the next call). Returns the keys whose uploads are gone now."""
        from botocore.exceptions import BotoCoreError, ClientError

        with self._uploads_lock:
            pending = dict(self._open_uploads)
        done = []
        for upload_id, key in pending.items():
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("NoSuchUpload", "404"):
                    continue  # access denied, throttled, ...: try again next time
            except BotoCoreError:
                continue  # unreachable: try again next time
            with self._uploads_lock:
                self._open_uploads.pop(upload_id, None)
            done.append(key)
        return done

    def put_file(self, key: str, src: Path, sha256: str) -> None:
        self.abort_open_uploads()  # an earlier attempt's leftovers, now that the endpoint may be back
        with self._uploads_lock:
            before = set(self._open_uploads)
        try:
            self._call("upload to", key, lambda: self.client.upload_file(
                str(src), self.bucket, key, Config=self.transfer, ExtraArgs={"Metadata": {"sha256": sha256}}))
        except BaseException:
            self.abort_open_uploads()
            raise
        with self._uploads_lock:  # completed: the upload this call started is no longer open
            for upload_id in set(self._open_uploads) - before:
                if self._open_uploads[upload_id] == key:
                    del self._open_uploads[upload_id]

    def put_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data,
                                  "Metadata": {"sha256": sha256_bytes(data)}}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        try:
            out = self._call("write", key, lambda: self.client.put_object(**kwargs))
        except ObjectMissing:  # If-Match on a key deleted meanwhile
            raise WriteConflict(f"{self.url(key)} disappeared since it was read") from None
        return str(out["ETag"])

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        try:
            out = self._call("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=key))
        except ObjectMissing:
            return None
        return self._call("read", key, out["Body"].read), str(out["ETag"])

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        out = self._call("read", key, lambda: self.client.get_object(Bucket=self.bucket, Key=key))
        body = out["Body"]
        chunks = body.iter_chunks(CHUNK)
        try:
            while True:
                chunk = self._call("read", key, lambda: next(chunks, None))
                if chunk is None:
                    return
                yield chunk
        finally:
            body.close()  # also when the caller stops early (an oversized object)

    def list_sizes(self, prefix: str) -> dict[str, int]:
        def collect() -> dict[str, int]:
            out: dict[str, int] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"]] = int(obj["Size"])
            return out

        return self._call("list", prefix, collect)


def s3_region(settings: StoreSettings) -> str | None:
    """SPOTTUNE_S3_REGION, else AWS_REGION, else None: boto3's own chain decides (AWS_DEFAULT_REGION, the
    profile's region, then us-east-1 for S3). boto3 reads AWS_REGION only on some platforms; the AWS
    SDKs and CLI v2 give it precedence over AWS_DEFAULT_REGION, and so does the store."""
    return settings.s3_region or os.environ.get("AWS_REGION") or None


def open_backend(settings: StoreSettings) -> Backend:
    """The backend the settings name; boto3 is imported only for 's3'."""
    if settings.store_backend == "s3":
        return S3Backend(settings)
    return LocalBackend(settings.store_root)
