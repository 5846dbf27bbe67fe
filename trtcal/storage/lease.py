"""Leases: concurrent jobs on one key compute once; the others wait and take the published entry.

A lease is a small JSON file beside the entries (`v1/<ns>/leases/<key[:2]>/<key>.json`) created with
the store's create-only write, so one job of many gets it. Its holder refreshes the expiry every
`ttl / 3` from a background thread while it computes, and removes the lease when done (published or
failed). A holder that dies (SIGKILL, lost node) stops refreshing: its lease expires after `ttl`
and the next waiter takes it over and computes.

Guarantees: correctness never depends on a lease (the entry commit is create-only, first writer
wins); a lease only avoids duplicate work. Taking over an expired lease is delete-then-create,
so two waiters that both saw it expired may both compute once in a while; both commits are safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from trtcal.errors import StorageError
from trtcal.storage.layout import StoreLayout

__all__ = ["Lease", "compute_once", "try_acquire", "read_lease"]

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """A held lease; refreshed in the background until `release()`."""

    layout: StoreLayout
    path: str
    holder: str
    ttl_s: float
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _body(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "expires_at": time.time() + self.ttl_s},
            sort_keys=True,
        ).encode()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                current = read_lease(self.layout, self.path)
                if current is None or current.get("holder") != self.holder:
                    log.warning("lost the lease %s (taken over after it expired?); computing on", self.layout.display(self.path))
                    return
                self.layout.backend.overwrite(self.path, self._body())
            except Exception as exc:  # a refresh that fails lets the lease expire: others compute too, safely
                log.warning("could not refresh the lease %s: %s", self.layout.display(self.path), self.layout.scrub.describe(exc))

    def start(self) -> Lease:
        self._thread = threading.Thread(target=self._refresh_loop, name="trtcal-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            current = read_lease(self.layout, self.path)
            if current is not None and current.get("holder") == self.holder:
                self.layout.backend.delete_file(self.path)
        except Exception as exc:  # it expires on its own
            log.warning("could not remove the lease %s: %s", self.layout.display(self.path), self.layout.scrub.describe(exc))


def read_lease(layout: StoreLayout, path: str) -> dict[str, Any] | None:
    """The lease's content; None if there is none. A damaged lease reads as expired."""
    try:
        data = layout.backend.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
        if isinstance(value, dict) and isinstance(value.get("expires_at"), (int, float)):
            return value
    except ValueError:
        pass
    return {"holder": "", "expires_at": 0.0}


def try_acquire(layout: StoreLayout, path: str, ttl_s: float) -> tuple[Lease | None, dict[str, Any] | None]:
    """(our lease, None) when we got it; (None, the holder's lease) when someone else holds it."""
    lease = Lease(layout, path, uuid.uuid4().hex, ttl_s)
    for _attempt in range(2):
        if layout.backend.create_only(path, lease._body()):
            return lease.start(), None
        current = read_lease(layout, path)
        if current is None:
            continue  # released between our attempt and our read
        if current["expires_at"] > time.time():
            return None, current
        log.info("lease %s expired (its holder died?); taking it over", layout.display(path))
        layout.backend.delete_file(path)
    current = read_lease(layout, path)
    return None, current or {"holder": "", "expires_at": time.time() + ttl_s}


@contextlib.contextmanager
def compute_once(
    layout: StoreLayout,
    path: str,
    key: str,
    get: Callable[[str], Any],
    *,
    leasing: bool,
    store_url: str,
    ttl_s: float,
    wait_s: float,
    poll_s: float,
) -> Iterator[Any]:
    """`CacheStore.compute_once`: yield the entry (`get(key)`) or, holding the lease, None."""
    entry = get(key)
    if entry is not None or not leasing:
        yield entry
        return
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        with layout.io("lease", path, missing_ok=False):
            lease, holder = try_acquire(layout, path, ttl_s)
        if lease is not None:
            try:
                yield get(key)  # None, unless published between our look and our lease
            finally:
                lease.release()
            return
        if not said:
            holder = holder or {}
            log.info("another job (%s, pid %s) is computing %s; waiting for its entry", holder.get("host", "?"), holder.get("pid", "?"), key)
            said = True
        if time.monotonic() > deadline:
            raise StorageError(
                f"waited {wait_s:.0f} s for another job computing {key} in {store_url}; its lease at {layout.display(path)} "
                "is still being refreshed. Try again later",
                url=store_url,
            )
        time.sleep(poll_s)
        entry = get(key)
        if entry is not None:
            yield entry
            return
