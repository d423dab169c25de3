"""Artifact store: published model versions, the production pointer and its audit trail.

Two backends behind one small interface (`Backend`): a local folder (the embedded default) and
S3-compatible object storage through boto3. Everything that matters for safety lives above the
interface, in `ArtifactStore`, so both backends get the same guarantees and the same tests.

Layout (keys below the configured prefix):

    models/NAME/versions/VERSION/model.safetensors   weights (safetensors: loads without executing code)
    models/NAME/versions/VERSION/model.json          params and class names (spottune.training's model card)
    models/NAME/versions/VERSION/params.json         the run's params
    models/NAME/versions/VERSION/metrics.json        test metrics and history
    models/NAME/versions/VERSION/data_version.txt    the data.dvc hash given by the caller
    models/NAME/versions/VERSION/report.md           the evaluation report (or a note that none was given)
    models/NAME/versions/VERSION/model_card.md       human-readable summary
    models/NAME/versions/VERSION/gate.json           the promotion gate's result: failed => candidate forever
    models/NAME/versions/VERSION/MANIFEST.json       sha256 and size of every file above; written LAST
    models/NAME/production.json                      the production pointer; written last on promotion
    models/NAME/audit/<UTC timestamp>-<uuid>.json    one object per promotion or rollback, never overwritten

Invariants:
- A version is complete only once its MANIFEST.json exists and every file it lists is present with
  the listed size; only complete versions whose files hash to the manifest are promoted or fetched.
- The manifest is written with a create-only condition, so it is never replaced: publishing a
  version again with the same files is a no-op, with other files it is refused.
- The production pointer is replaced with a compare-and-swap (S3 If-Match / If-None-Match, a file
  lock locally) so two concurrent promotions serialise instead of losing one another's history.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import socket
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from spottune.config import StoreSettings
from spottune.errors import StoreError

STORE_FORMAT = "spottune-store/1"
MANIFEST = "MANIFEST.json"
GATE = "gate.json"
WEIGHTS = "model.safetensors"
VERSION_FILES: tuple[str, ...] = (
    WEIGHTS, "model.json", "params.json", "metrics.json", "data_version.txt", "report.md", "model_card.md", GATE,
)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: `$` also matches before a final newline
# A finished run's files and model format, as spottune.training writes them (RunDir, MODEL_FORMAT).
# Repeated here so publishing needs no torch import; a test checks they agree.
RUN_FILES: tuple[str, str, str] = (WEIGHTS, "model.json", "metrics.json")
RUN_MODEL_FORMAT = "spottune-model/1"
CHUNK = 1 << 20
HISTORY_LIMIT = 100
CAS_ATTEMPTS = 20


class StoreMisconfigured(StoreError):
    """Settings or permissions are wrong (no credentials, no bucket, access denied, a store folder that
    cannot be written): retrying cannot help, a person must fix them."""


class ObjectMissing(StoreError):
    """The key does not exist."""


class IntegrityError(StoreError):
    """Stored bytes do not match their recorded sha256 or size, or a file is not what it claims to be."""


class WriteConflict(StoreError):
    """A conditional write lost the race: the object changed (or appeared) since it was read."""


class PromotionRefused(StoreError):
    """The version may not become production: incomplete, unverified, or its gate failed."""


# --------------------------------------------------------------------------------------------
# Backends: plain blob storage, no model logic.


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

    A per-process temporary name (as in spottune.engine.atomic_write) is not enough here: two
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
            with open(src, "rb") as s:
                while chunk := s.read(CHUNK):
                    f.write(chunk)

        self._write_atomic(self._path(key), copy)

    def put_bytes(self, key: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False) -> str:
        path = self._path(key)
        if if_match is None:
            self._write_atomic(path, lambda f: f.write(data), exclusive=if_absent)
            return _sha256_bytes(data)
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{_sha256_bytes(key.encode())}.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = path.read_bytes() if path.is_file() else None
                if current is None or _sha256_bytes(current) != if_match:
                    raise WriteConflict(f"{self.url(key)} changed since it was read")
                self._write_atomic(path, lambda f: f.write(data))
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return _sha256_bytes(data)

    def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data, _sha256_bytes(data)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")
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
            from spottune.config import shown_endpoint

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
            ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError, ReadTimeoutError,
            ConnectTimeoutError,
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
                                  "Metadata": {"sha256": _sha256_bytes(data)}}
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


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Gate:
    """The promotion gate's verdict for one version, recorded in its gate.json (and so in its manifest)."""

    passed: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "details": self.details}


@dataclass(frozen=True)
class VersionInfo:
    """One row of `list_versions`."""

    version: str
    complete: bool
    gate_passed: bool | None
    production: bool
    created_at: str | None = None
    method: str | None = None
    backbone: str | None = None
    test_accuracy: float | None = None
    data_version: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class PublishResult:
    version: str
    manifest_sha256: str
    uploaded: list[str]
    skipped: list[str]
    already_published: bool


def content_version(entries: dict[str, dict[str, Any]]) -> str:
    """The default version of a set of files: 12 hex of the weights' sha256, then 6 hex of the sha256 of
    every published file (metrics.json with its timings, model.json, gate, report, data version, ...).

    The same files always give the same version (re-publishing is a no-op), while identical weights
    published with anything else (a forced retrain's new timings, another clone's run) get a version of
    their own instead of clashing with the one already stored.
    """
    digests = {f: e["sha256"] for f, e in sorted(entries.items())}
    return f"{entries[WEIGHTS]['sha256'][:12]}-{_sha256_bytes(_dump(digests))[:6]}"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_actor() -> str:
    """user@host of this process: who promoted, for the audit trail."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise StoreError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    return value


def check_prefix(prefix: str) -> str:
    """A key prefix: '/'-separated names, no leading '/', no empty, '.' or '..' segment (S3 keys would
    otherwise read as paths that climb out of the prefix for any tool that maps them to folders)."""
    if prefix and (prefix.startswith("/") or any(p in ("", ".", "..") for p in prefix.split("/"))
                   or not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in prefix.split("/"))):
        raise StoreError(f"invalid store prefix {prefix!r}: use names of letters, digits, '.', '_' or '-' separated "
                         "by '/', without a leading '/', empty parts, '.' or '..'")
    return prefix


def _dump(obj: Any) -> bytes:
    """Canonical JSON: the same content always gives the same bytes, hence the same sha256."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file (a pickle renamed, a truncated file) before upload.

    Reads only the header: 8-byte little-endian length, then that many bytes of JSON. No torch needed.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise IntegrityError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or 8 + n > size:
            raise IntegrityError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise IntegrityError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path} is not a safetensors file (header is not a mapping)")


# --------------------------------------------------------------------------------------------
# The store


class ArtifactStore:
    """Publish, verify, promote, roll back and fetch model versions on any Backend."""

    def __init__(self, backend: Backend, prefix: str = "") -> None:
        self.backend = backend
        self.prefix = check_prefix(prefix)

    # keys -------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def model_key(self, name: str, *rest: str) -> str:
        return self._key("models", _check_name("model name", name), *rest)

    def version_key(self, name: str, version: str, filename: str = "") -> str:
        return self.model_key(name, "versions", _check_name("version", version), filename)

    # verification -----------------------------------------------------------------------
    def _stored_sha256(self, key: str) -> str:
        h = hashlib.sha256()
        for chunk in self.backend.iter_chunks(key):
            h.update(chunk)
        return h.hexdigest()

    def _upload_verified(self, key: str, src: Path, sha256: str) -> None:
        """Upload, then read the object back and hash it: download-and-hash, not ETag or HEAD.

        Why: an S3 ETag is an MD5 only for single-part unencrypted uploads; a multipart ETag is an
        MD5 of part MD5s, and S3's own SHA256 checksums of multipart objects are composite (per
        part), so neither equals the manifest's full-object sha256. Metadata from HEAD is only what
        we sent. Reading the bytes back is the one check that proves the store holds exactly the
        file the manifest describes; it costs one extra read of each file per publish.
        """
        self.backend.put_file(key, src, sha256)
        got = self._stored_sha256(key)
        if got != sha256:
            raise IntegrityError(f"upload of {src.name} to {self.backend.url(key)} did not verify: "
                                 f"sha256 {got} stored, {sha256} sent")

    def read_manifest(self, name: str, version: str) -> tuple[dict[str, Any], str]:
        """The version's manifest and the sha256 of its bytes; PromotionRefused when absent or malformed."""
        key = self.version_key(name, version, MANIFEST)
        got = self.backend.get_bytes(key)
        if got is None:
            raise PromotionRefused(f"{name} {version} is incomplete: {self.backend.url(key)} does not exist")
        data, _ = got
        try:
            manifest = json.loads(data)
            files = manifest["files"]
            for fname, entry in files.items():
                if fname not in VERSION_FILES:
                    raise ValueError(f"unexpected file {fname!r}")
                if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) or int(entry["size"]) < 0:
                    raise ValueError(f"bad entry for {fname!r}")
            if set(files) != set(VERSION_FILES):
                raise ValueError(f"files {sorted(files)} are not {sorted(VERSION_FILES)}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{self.backend.url(key)} is not a valid manifest: {e}") from None
        return manifest, _sha256_bytes(data)

    def verify_version(self, name: str, version: str,
                       expected_manifest_sha256: str | None = None) -> tuple[dict[str, Any], str]:
        """Hash every stored file of the version against its manifest; return the manifest and its sha256.

        IntegrityError names the first file whose bytes differ (or whose manifest was swapped after
        promotion, when expected_manifest_sha256 is given).
        """
        manifest, manifest_sha = self.read_manifest(name, version)
        self._check_manifest_sha(name, version, manifest_sha, expected_manifest_sha256)
        for fname, entry in sorted(manifest["files"].items()):
            key = self.version_key(name, version, fname)
            try:
                got = self._stored_sha256(key)
            except ObjectMissing:
                raise PromotionRefused(f"{name} {version} is incomplete: {self.backend.url(key)} is missing") from None
            if got != entry["sha256"]:
                raise IntegrityError(f"{self.backend.url(key)} does not match its manifest: sha256 {got}, "
                                     f"manifest says {entry['sha256']}")
        return manifest, manifest_sha

    def _check_manifest_sha(self, name: str, version: str, got: str, expected: str | None) -> None:
        if expected is not None and got != expected:
            raise IntegrityError(f"the manifest of {name} {version} changed after it was promoted: "
                                 f"sha256 {got}, production pointer says {expected}")

    # publish ----------------------------------------------------------------------------
    def publish(
        self,
        run_dir: Path,
        name: str,
        version: str | None = None,
        *,
        gate: Gate,
        data_version: str | None = None,
        report: Path | None = None,
        actor: str | None = None,
        log: Callable[[str], None] = lambda _: None,
    ) -> PublishResult:
        """Upload a finished run as NAME/VERSION, each file verified, MANIFEST.json last.

        Idempotent: files already stored with the right sha256 are skipped, so re-running after a
        failure mid-upload only sends what is missing. A version whose manifest already exists is
        left as it is when its files are the same, and refused when they differ. The version
        defaults to `content_version`: 12 hex of the weights' sha256 and 6 of every published file,
        so the same files always map to the same version and other content never clashes with it. The gate's verdict is one of the files: a failed gate makes a candidate
        that `promote` will always refuse.
        """
        from tempfile import TemporaryDirectory

        _check_name("model name", name)
        with TemporaryDirectory(prefix="spottune-publish-") as tmp:
            files = self._stage(Path(run_dir), Path(tmp), name, gate, data_version, report)
            entries = {f: {"sha256": sha256_file(p), "size": p.stat().st_size} for f, p in files.items()}
            version = _check_name("version", version or content_version(entries))
            existing = self._existing_manifest(name, version)
            if existing is not None:
                return self._same_or_refuse(name, version, existing, entries)

            stored = self.backend.list_sizes(self.version_key(name, version) + "/")
            uploaded, skipped = [], []
            for fname in VERSION_FILES:
                key = self.version_key(name, version, fname)
                entry = entries[fname]
                if stored.get(key) == entry["size"] and self._stored_sha256(key) == entry["sha256"]:
                    skipped.append(fname)
                    continue
                self._upload_verified(key, files[fname], entry["sha256"])
                uploaded.append(fname)
                log(f"uploaded {fname} -> {self.backend.url(key)}")

            manifest = {"format": STORE_FORMAT, "name": name, "version": version, "created_at": _now(),
                        "created_by": actor or default_actor(), "gate_passed": gate.passed, "files": entries}
            data = _dump(manifest)
            key = self.version_key(name, version, MANIFEST)
            try:
                self.backend.put_bytes(key, data, if_absent=True)
            except WriteConflict:  # a concurrent publisher finished first
                existing = self._existing_manifest(name, version)
                assert existing is not None
                return self._same_or_refuse(name, version, existing, entries)
            if self.read_manifest(name, version)[1] != _sha256_bytes(data):
                raise IntegrityError(f"{self.backend.url(key)} did not verify after upload")
            log(f"published {name} {version} -> {self.backend.url(key)}")
            return PublishResult(version, _sha256_bytes(data), uploaded, skipped, already_published=False)

    def publish_candidate(self, run_dir: Path, name: str, version: str | None = None, *, reason: str,
                          **kwargs: Any) -> PublishResult:
        """Publish a version that failed (or skipped) the gate: stored and listed, never promotable."""
        return self.publish(run_dir, name, version, gate=Gate(False, reason), **kwargs)

    def _existing_manifest(self, name: str, version: str) -> tuple[dict[str, Any], str] | None:
        try:
            return self.read_manifest(name, version)
        except PromotionRefused:
            return None

    def _same_or_refuse(self, name: str, version: str, existing: tuple[dict[str, Any], str],
                        entries: dict[str, dict[str, Any]]) -> PublishResult:
        manifest, manifest_sha = existing
        differ = sorted(f for f in entries if manifest["files"].get(f) != entries[f])
        if differ:
            raise StoreError(f"{name} {version} is already published with other content ({', '.join(differ)} "
                             f"differ in {self.backend.url(self.version_key(name, version, MANIFEST))}): "
                             "publish under a new version")
        return PublishResult(version, manifest_sha, [], list(VERSION_FILES), already_published=True)

    def _stage(self, run_dir: Path, tmp: Path, name: str, gate: Gate, data_version: str | None,
               report: Path | None) -> dict[str, Path]:
        """Collect the version's files: the run's own, plus generated ones with deterministic content."""
        weights, model_json, metrics_json = (run_dir / f for f in RUN_FILES)
        for p in (weights, model_json, metrics_json):
            if not p.is_file():
                raise StoreError(f"{run_dir} is not a finished run: {p.name} is missing")
        check_safetensors(weights)
        try:
            card = json.loads(model_json.read_text())
            metrics = json.loads(metrics_json.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{run_dir}: unreadable model.json or metrics.json: {e}") from None
        if not isinstance(card, dict) or card.get("format") != RUN_MODEL_FORMAT:
            got = card.get("format") if isinstance(card, dict) else card
            raise StoreError(f"{model_json}: unknown format {got!r}, expected {RUN_MODEL_FORMAT}")
        if not isinstance(metrics, dict):
            raise StoreError(f"{metrics_json}: expected a JSON object")
        if report is not None and not Path(report).is_file():
            raise StoreError(f"report file not found: {report}")
        dv = (data_version or "").strip()
        if dv and not re.fullmatch(r"[0-9a-fA-F]{6,64}(\.dir)?", dv):
            raise StoreError(f"data version {dv!r} is not a DVC hash (hex digits, optionally ending in .dir)")

        files = {WEIGHTS: weights, "model.json": model_json, "metrics.json": metrics_json}
        generated = {
            "params.json": _dump(card.get("params", {})),
            "data_version.txt": ((dv or "unknown") + "\n").encode(),
            "report.md": Path(report).read_bytes() if report else b"No evaluation report was supplied at publish time.\n",
            "model_card.md": model_card_markdown(name, card, metrics, dv or "unknown", gate).encode(),
            GATE: _dump(gate.to_json()),
        }
        for fname, data in generated.items():
            (tmp / fname).write_bytes(data)
            files[fname] = tmp / fname
        return files

    # promote / rollback -------------------------------------------------------------------
    def production(self, name: str) -> dict[str, Any] | None:
        """The production pointer of NAME, or None when nothing was ever promoted."""
        got = self._read_pointer(name)
        return got[0] if got else None

    def _read_pointer(self, name: str) -> tuple[dict[str, Any], str] | None:
        key = self.model_key(name, "production.json")
        got = self.backend.get_bytes(key)
        if got is None:
            return None
        try:
            pointer = json.loads(got[0])
            _check_pointer_entry(pointer, "")
            history = pointer.get("history", [])
            if not isinstance(history, list):
                raise ValueError(f"history is a {type(history).__name__}, not a list")
            for i, entry in enumerate(history):
                _check_pointer_entry(entry, f"history[{i}]: ")
        except (ValueError, KeyError, TypeError, AttributeError, StoreError) as e:
            raise IntegrityError(f"{self.backend.url(key)} is not a valid production pointer: "
                                 f"{type(e).__name__ + ' ' if isinstance(e, KeyError) else ''}{e}") from None
        return pointer, got[1]

    def _gate_of(self, name: str, version: str) -> dict[str, Any]:
        data = self.backend.get_bytes(self.version_key(name, version, GATE))
        return json.loads(data[0]) if data else {"passed": False, "reason": "no gate.json"}

    def promote(self, name: str, version: str, *, reason: str = "", actor: str | None = None) -> dict[str, Any]:
        """Make VERSION production: verify manifest, files and gate first; write the pointer last.

        Refuses (PromotionRefused) an incomplete version, one whose files do not hash to its
        manifest, or one whose recorded gate failed. Promoting the current production version is a
        no-op. The pointer is replaced by compare-and-swap, so concurrent promotions serialise;
        each success appends one audit record.
        """
        manifest, manifest_sha = self.verify_version(name, version)
        gate = self._gate_of(name, version)
        if gate.get("passed") is not True or manifest.get("gate_passed") is not True:
            raise PromotionRefused(f"{name} {version} failed its promotion gate ({gate.get('reason') or 'no reason'}): "
                                   "it stays a candidate and never becomes production")

        def update(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is not None and current["version"] == version:
                return None
            history = ([*current.get("history", []), _history_entry(current)] if current else [])[-HISTORY_LIMIT:]
            return {"version": version, "manifest_sha256": manifest_sha, "history": history}

        return self._swap_pointer(name, "promote", update, reason, actor)

    def rollback(self, name: str, *, reason: str = "", actor: str | None = None,
                 expect_current: str | None = None) -> dict[str, Any]:
        """Make the previous production version (top of the pointer's history) production again, verified.

        expect_current makes a retry safe: roll back only from that version. When production already
        is what rolling back from it gave (an outage hid the answer), nothing moves again; the audit
        record is written if it is missing. When production is something else, nothing is done.
        """
        def update(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if expect_current is not None and current is not None and current["version"] != expect_current:
                if current.get("action") == "rollback" and current.get("previous_version") == expect_current:
                    return None  # this rollback already happened
                raise PromotionRefused(f"{name}: production is {current['version']}, not {expect_current}; "
                                       "nothing rolled back")
            if current is None or not current.get("history"):
                raise PromotionRefused(f"{name} has no earlier production version to roll back to")
            previous = current["history"][-1]
            self.verify_version(name, previous["version"], previous["manifest_sha256"])
            return {"version": previous["version"], "manifest_sha256": previous["manifest_sha256"],
                    "history": current["history"][:-1]}

        return self._swap_pointer(name, "rollback", update, reason, actor)

    def _swap_pointer(self, name: str, action: str, update: Callable[[dict[str, Any] | None], dict[str, Any] | None],
                      reason: str, actor: str | None) -> dict[str, Any]:
        """Read-modify-write of production.json with a condition on what was read; retry on conflict."""
        key = self.model_key(name, "production.json")
        for _ in range(CAS_ATTEMPTS):
            got = self._read_pointer(name)
            current, tag = got if got else (None, None)
            new = update(current)
            if new is None:
                assert current is not None
                self._audit(name, current)  # a retry after an outage between pointer and audit record
                return current
            now = datetime.now(timezone.utc)
            new = {"format": STORE_FORMAT, "name": name, **new, "action": action,
                   "previous_version": current["version"] if current else None,
                   "by": actor or default_actor(), "at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "reason": reason,
                   "audit_id": f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex}"}
            try:
                self.backend.put_bytes(key, _dump(new), if_match=tag, if_absent=tag is None)
            except WriteConflict:
                continue
            self._audit(name, new)
            return new
        raise WriteConflict(f"{self.backend.url(key)} kept changing: gave up after {CAS_ATTEMPTS} attempts")

    def _audit(self, name: str, pointer: dict[str, Any]) -> None:
        """Write the audit record of a pointer unless it is there: one object per pointer, never overwritten.

        Why keyed by the pointer's audit_id (UTC timestamp, then a uuid): the pointer is written
        first, so an outage between the two writes leaves a production version without its record.
        The retry (promoting the same version again) finds the pointer unchanged and writes the
        missing record under the same key; create-only, so a record never appears twice.
        Pointers written before audit ids existed got their record with them and are skipped.
        """
        audit_id = pointer.get("audit_id")
        if audit_id is None:
            return
        key = self.model_key(name, "audit", f"{_check_name('audit id', str(audit_id))}.json")
        record = {"format": STORE_FORMAT, "action": pointer.get("action"), "name": name,
                  "version": pointer["version"], "manifest_sha256": pointer.get("manifest_sha256"),
                  "previous_version": pointer.get("previous_version"), "by": pointer.get("by"),
                  "at": pointer.get("at"), "reason": pointer.get("reason", "")}
        try:
            self.backend.put_bytes(key, _dump(record), if_absent=True)
        except WriteConflict:
            pass  # recorded already (by the first attempt, or by a request the outage delayed)

    def audit_trail(self, name: str) -> list[dict[str, Any]]:
        """Every promotion and rollback of NAME, oldest first (by key: UTC timestamp, then uuid)."""
        out = []
        for key in sorted(self.backend.list_sizes(self.model_key(name, "audit") + "/")):
            got = self.backend.get_bytes(key)
            if got is not None:
                out.append(json.loads(got[0]))
        return out

    # list / fetch ---------------------------------------------------------------------------
    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version stored under NAME, complete or not, with gate, metrics summary and production flag.

        Complete means: a valid manifest and every listed file present with its size (sizes only:
        hashing is left to promote and fetch, which must read the bytes anyway).
        """
        base = self.model_key(name, "versions") + "/"
        sizes = self.backend.list_sizes(base)
        versions = sorted({k[len(base):].split("/", 1)[0] for k in sizes})
        pointer = self.production(name)
        rows = []
        for v in versions:
            rows.append(self._version_info(name, v, sizes, pointer))
        return sorted(rows, key=lambda r: (r.created_at is None, r.created_at or "", r.version))

    def _version_info(self, name: str, version: str, sizes: dict[str, int], pointer: dict[str, Any] | None) -> VersionInfo:
        is_prod = pointer is not None and pointer["version"] == version
        try:
            manifest, _ = self.read_manifest(name, version)
        except PromotionRefused:
            return VersionInfo(version, False, None, is_prod, problem="no MANIFEST.json (upload unfinished)")
        except IntegrityError as e:
            return VersionInfo(version, False, None, is_prod, problem=str(e))
        missing = [f for f, e in manifest["files"].items() if sizes.get(self.version_key(name, version, f)) != e["size"]]
        metrics = self._json_or_none(self.version_key(name, version, "metrics.json")) or {}
        dv = self.backend.get_bytes(self.version_key(name, version, "data_version.txt"))
        return VersionInfo(
            version, complete=not missing, gate_passed=manifest.get("gate_passed"), production=is_prod,
            created_at=manifest.get("created_at"), method=metrics.get("method"), backbone=metrics.get("backbone"),
            test_accuracy=(metrics.get("test") or {}).get("accuracy"),
            data_version=dv[0].decode(errors="replace").strip() if dv else None,
            problem=f"missing or wrong size: {', '.join(missing)}" if missing else None,
        )

    def _json_or_none(self, key: str) -> Any:
        got = self.backend.get_bytes(key)
        try:
            return json.loads(got[0]) if got else None
        except ValueError:
            return None

    def fetch_version(self, name: str, version: str, dest: Path, *, expected_manifest_sha256: str | None = None) -> Path:
        """Download every file of the version into dest (new or empty), each checked against the manifest.

        Files are hashed while they stream to a temporary name and renamed only when they verify;
        on any mismatch dest is emptied again and IntegrityError names the file.
        """
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise StoreError(f"fetch destination {dest} is not empty")
        manifest, manifest_sha = self.read_manifest(name, version)
        self._check_manifest_sha(name, version, manifest_sha, expected_manifest_sha256)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for fname, entry in sorted(manifest["files"].items()):
                self._download_verified(self.version_key(name, version, fname), dest / fname, entry)
            (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except BaseException:
            for p in dest.iterdir():
                p.unlink()
            raise
        return dest

    def _download_verified(self, key: str, target: Path, entry: dict[str, Any]) -> None:
        h = hashlib.sha256()
        size = 0
        tmp = target.with_name(f".{target.name}.part")
        try:
            with open(tmp, "wb") as f:
                for chunk in self.backend.iter_chunks(key):
                    h.update(chunk)
                    size += len(chunk)
                    if size > entry["size"]:
                        break  # do not stream an oversized object to the end
                    f.write(chunk)
            if size != entry["size"] or h.hexdigest() != entry["sha256"]:
                raise IntegrityError(f"{self.backend.url(key)} does not match its manifest "
                                     f"(sha256 {h.hexdigest() if size == entry['size'] else '-'}, size {size}; "
                                     f"manifest: {entry['sha256']}, {entry['size']} bytes): refused")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _check_pointer_entry(entry: Any, where: str) -> None:
    """A pointer, or one entry of its history: a valid version and a sha256 (what promote and rollback use)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}expected an object, got {type(entry).__name__}")
    _check_name("version", entry["version"])
    if not isinstance(entry.get("manifest_sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["manifest_sha256"]):
        raise ValueError(f"{where}manifest_sha256 of {entry['version']} is not a sha256")


def _history_entry(pointer: dict[str, Any]) -> dict[str, Any]:
    return {k: pointer.get(k) for k in ("version", "manifest_sha256", "by", "at", "action")}


def model_card_markdown(name: str, card: dict[str, Any], metrics: dict[str, Any], data_version: str, gate: Gate) -> str:
    """A short human-readable card; deterministic (no timestamps) so re-publishing yields the same bytes."""
    model = card.get("params", {}).get("model", {})
    test = metrics.get("test") or {}
    acc = test.get("accuracy")
    lines = [
        f"# {name}",
        "",
        f"- method: {model.get('method', '?')} on {model.get('backbone', '?')}",
        f"- classes ({len(card.get('classes', []))}): {', '.join(map(str, card.get('classes', [])))}",
        f"- test top-1 accuracy: {acc:.4f}" if isinstance(acc, (int, float)) else "- test top-1 accuracy: n/a",
        f"- data version (data.dvc md5): {data_version}",
        f"- promotion gate: {'passed' if gate.passed else 'FAILED (candidate only)'}"
        + (f" ({gate.reason})" if gate.reason else ""),
        "- weights: model.safetensors (loads without executing code); every file's sha256 is in MANIFEST.json",
        "",
    ]
    return "\n".join(lines)


def open_store(settings: StoreSettings, *, check: bool = True) -> ArtifactStore:
    """The store the settings describe; with check, fail now (clear StoreError) if it is unreachable."""
    backend = open_backend(settings)
    if check:
        backend.check()
    return ArtifactStore(backend, settings.store_prefix)


def load_production_model(store: ArtifactStore, name: str, dest: Path | None = None):
    """Fetch NAME's production version, verify every file, and rebuild the model from safetensors.

    Returns (model, params, classes, pointer). The manifest must be the one the pointer recorded,
    so swapping a promoted version's files and manifest afterwards is detected too. With dest None
    the files go to a new temporary directory that the caller owns (it is not removed).
    """
    from spottune.training import load_model

    pointer = store.production(name)
    if pointer is None:
        raise StoreError(f"{name} has no production version in {store.backend.url(store.model_key(name))}")
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix=f"spottune-{name}-"))
    store.fetch_version(name, pointer["version"], dest, expected_manifest_sha256=pointer["manifest_sha256"])
    check_safetensors(Path(dest) / WEIGHTS)  # a clear message first; load_model never unpickles either way
    model, params, classes = load_model(dest)
    return model, params, classes, pointer
