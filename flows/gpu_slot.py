"""The retrain flow's GPU slot: one slot of a Prefect global concurrency limit, held while the stages run,
so two flows never train on one GPU at once (limit `spottune-gpu`, or the flow's `gpu_limit`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger


@contextmanager
def gpu_slot(name: str) -> Iterator[None]:
    """Hold one slot of the global concurrency limit NAME (created with 1 slot if missing).

    Prefect ignores a limit that does not exist (strict=False) and refuses with strict=True, so the
    flow creates it first: a fresh server then serialises training without any set-up step.

    A holder killed while it trains (SIGKILL, a lost machine) cannot give its slot back. A real
    server is to revoke the slot once its lease expires (not tested here); Prefect's temporary
    server keeps leases in its own memory, gone with it, so no later server would, and every later
    run would wait for ever. So the holder is also recorded in a file beside Prefect's database
    (slot_holder), and with the temporary server a run that finds the record of a holder that is
    gone gives that slot back.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import get_current_settings

    logger = get_run_logger()
    settings = get_current_settings()
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another flow created it meanwhile
                pass
    logger.info("waiting for a slot of concurrency limit %r", name)
    with slot_holder(Path(settings.home) / f"{name}.holder") as record:
        if record.gone and settings.api.url is None:  # the temporary server: nobody else will
            held = max(1.0, time.time() - record.gone.get("since", time.time()))
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots([name], 1, occupancy_seconds=held)
            logger.warning("gave back the slot of concurrency limit %r that a run killed while training kept "
                           "(pid %s on %s, %.0f s before)", name, record.gone.get("pid"), record.gone.get("host"), held)
        try:
            with concurrency(name, occupy=1, strict=True):
                record.hold()
                logger.info("holding concurrency limit %r", name)
                yield
        finally:  # the slot is given back (or was never taken): nothing left to reclaim
            record.clear()


class _HolderRecord:
    """What slot_holder yields: the record a holder that is gone left (empty if none), and the current one."""

    def __init__(self, file: Any) -> None:
        self._file = file
        text = file.read().strip()
        try:
            self.gone: dict[str, Any] = json.loads(text) if text else {}
        except json.JSONDecodeError:  # cut short by the kill
            self.gone = {"pid": "?", "host": "?"}

    def hold(self) -> None:
        self._write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}))

    def clear(self) -> None:
        self._write("")

    def _write(self, text: str) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())


@contextmanager
def slot_holder(path: Path) -> Iterator[_HolderRecord]:
    """Lock PATH for the slot's holder on this machine, and yield its record.

    The lock (flock) goes with its process, however that ends, so a record found under the lock was
    left by a holder that is gone: a holder that ends normally clears it after giving its slot back.
    Runs on one machine wait here for each other; the limit still serialises runs across machines.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            file.seek(0)
            yield _HolderRecord(file)
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
