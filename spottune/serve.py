"""`spottune serve`: an HTTP API over a model from the artifact store (FastAPI, run by uvicorn).

    GET  /health    {"status": "ok", "version": V}
    GET  /model     name, version, classes, and what the store records for the version (manifest,
                    gate, data version, params, test metrics, lineage; for production, who promoted it and when)
    POST /predict   multipart field `file`: {"label", "probability", "top": [{label, probability}], "version"}

Bad uploads get a 4xx answer with a JSON body {"error": "..."}: not an image (415), more pixels
than Pillow's limit, read from the header before decoding (413), more bytes than --max-upload-mb
(413, refused from Content-Length before the body is read, or as soon as the body passes it).

For NAME@production (or NAME@latest) a thread checks the store every --poll-s seconds. A new version
is fetched, verified against its manifest and loaded beside the model in use, then swapped in with one
assignment: each request uses the model it started with, and a version that fails to fetch, verify or
load is logged and never served (the old one stays; that version is tried again after a minute).
"""

import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spottune.errors import ConfigError, SpotTuneError

MULTIPART_SLACK = 64 * 1024  # the multipart framing around the file, allowed on top of the upload limit


def _log(message: str) -> None:
    print(f"spottune serve: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Loaded:
    """One model version, verified and ready: what a request uses from start to end."""

    predictor: Any
    resolved: Any  # spottune.model_cache.Resolved
    metadata: dict[str, Any]
    loaded_at: str


class ModelHolder:
    """The model in use for NAME@REF; `current` is replaced whole, never changed in place."""

    def __init__(self, store, name: str, ref: str, cache_dir: Path | None, device: str = "cpu",
                 log: Callable[[str], None] = _log) -> None:
        from spottune.model_cache import resolve

        self.store, self.name, self.ref, self.cache_dir, self.device, self.log = store, name, ref, cache_dir, device, log
        self.current = self._load(resolve(store, name, ref))
        self._refused: tuple[tuple[str, str], float] | None = None  # a version that failed, and when to retry it

    def _load(self, resolved) -> Loaded:
        from spottune.inference import Predictor
        from spottune.model_cache import fetch_cached, version_metadata

        folder = fetch_cached(self.store, resolved, self.cache_dir, log=self.log)
        predictor = Predictor.from_folder(folder, self.device)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return Loaded(predictor, resolved, version_metadata(folder), now)

    @property
    def follows(self) -> bool:
        """Whether the reference can move (production, latest) rather than name one version."""
        from spottune.model_cache import REFS

        return self.ref in REFS

    def refresh(self, retry_after_s: float = 60.0) -> bool:
        """Resolve the reference again; load and swap in the version it names when it is another one.
        A version that failed to fetch, verify or load is tried again only after retry_after_s."""
        from spottune.model_cache import resolve

        resolved = resolve(self.store, self.name, self.ref)
        old = self.current
        ident = (resolved.version, resolved.manifest_sha256)
        if ident == (old.resolved.version, old.resolved.manifest_sha256):
            return False
        if self._refused is not None and self._refused[0] == ident and time.monotonic() < self._refused[1]:
            return False
        self.log(f"{self.name}@{self.ref} is now {resolved.version}: loading it (serving {old.resolved.version} meanwhile)")
        try:
            loaded = self._load(resolved)
        except BaseException:
            self._refused = (ident, time.monotonic() + retry_after_s)
            raise
        self.current = loaded
        self.log(f"now serving {self.name} {resolved.version}")
        return True

    def watch(self, interval_s: float, stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            try:
                self.refresh(retry_after_s=max(60.0, interval_s))
            except SpotTuneError as e:
                self.log(f"still serving {self.current.resolved.version}: {e}")
            except Exception as e:  # noqa: BLE001 - the watcher must survive anything a check throws
                self.log(f"still serving {self.current.resolved.version}: {type(e).__name__}: {e}")


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes, by Content-Length or while it streams in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body exceeds the upload limit of {self.limit - MULTIPART_SLACK} bytes"
        length = dict(scope.get("headers", [])).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


def create_app(holder: ModelHolder, *, max_upload_bytes: int = 10_000_000, max_pixels: int | None = None,
               poll_s: float = 30.0):
    from fastapi import FastAPI, File, Query, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from spottune.data.images import ImageTooLarge
    from spottune.errors import DataError
    from spottune.inference import read_upload

    @asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        if holder.follows:
            threading.Thread(target=holder.watch, args=(poll_s, stop), daemon=True, name="model-watch").start()
        yield
        stop.set()

    app = FastAPI(title="SpotTune", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_upload_bytes + MULTIPART_SLACK)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(422, f"invalid request: {problems}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": holder.current.resolved.version}

    @app.get("/model")
    def model() -> dict[str, Any]:
        loaded = holder.current
        r = loaded.resolved
        pointer = r.pointer or {}
        return {
            "name": r.name, "ref": r.ref, "version": r.version, "manifest_sha256": r.manifest_sha256,
            "classes": loaded.predictor.classes, "loaded_at": loaded.loaded_at,
            "source": holder.store.backend.url(holder.store.version_key(r.name, r.version)),
            "promotion": {k: pointer.get(k) for k in ("action", "at", "by", "reason", "previous_version")}
            if r.pointer else None,
            **loaded.metadata,
        }

    @app.post("/predict")
    def predict(file: UploadFile = File(...), top_k: int = Query(3, ge=1)) -> Any:
        loaded = holder.current  # this request's model, whatever is promoted meanwhile
        name = file.filename or "upload"
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return error(413, f"upload {name!r} exceeds the limit of {max_upload_bytes} bytes")
        if not data:
            return error(400, f"upload {name!r} is empty")
        try:
            image = read_upload(data, name, max_pixels)
        except ImageTooLarge as e:
            return error(413, str(e))
        except DataError as e:
            return error(415, f"{e} (not an image?)")
        row = loaded.predictor.predict_image(image, name, top_k=top_k)
        out = {"label": row["label"], "probability": row["probability"], "top": row["top"],
               "version": loaded.resolved.version}
        if "tuned_blocks" in row:
            out["tuned_blocks"] = row["tuned_blocks"]
        return out

    return app


def serve(args, runtime) -> int:
    """`spottune serve`: load the model (fail now, clearly, when it cannot be), then run uvicorn."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"spottune serve needs fastapi, uvicorn and python-multipart ({e.name} is missing): "
                          "pip install 'spottune[serve]'") from None
    from spottune.model_cache import parse_model_ref
    from spottune.store import open_store
    from spottune.store_cli import store_settings

    name, ref = parse_model_ref(args.model)
    settings = store_settings()
    started = time.monotonic()
    holder = ModelHolder(open_store(settings), name, ref, args.cache_dir or settings.model_cache_dir, runtime.device)
    app = create_app(holder, max_upload_bytes=int(args.max_upload_mb * 1_000_000), max_pixels=args.max_pixels,
                     poll_s=args.poll_s)
    follow = f", checking {name}@{ref} every {args.poll_s:g} s" if holder.follows else ""
    _log(f"{name} {holder.current.resolved.version} loaded in {time.monotonic() - started:.1f} s; "
         f"listening on http://{args.host}:{args.port}{follow}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
