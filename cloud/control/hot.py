"""What the devices' hot path reads, kept in memory: who a bearer token is, and each
device's desired-state answer.

A fleet of N devices polling every `poll_s` seconds sends N / poll_s desired-state
requests a second, nearly all answered `304`. Reading a token and a device row through
the ORM for each costs a thread hop and a transaction; this cache answers them from
memory instead, and the database is read only for the first request after a change.

Consistency
-----------
* Entries are dropped when a **committed** transaction of this process changed the rows
  they came from (`watch` installs SQLAlchemy session events): a device's entry when its
  `generation`, `desired_model` or `revoked_at` changed; every identity when any
  principal changed (a revocation, a new token). Every desired model change bumps the
  generation (`app._set_desired`), so the generation names the answer.
* A loader that read the database before such a commit could store an old answer after
  the commit dropped it. `epoch()` is taken before the read and `put_*` stores only if no
  invalidation happened since; a lost store costs one more read, never a stale answer.
* The cache sees only this process's commits: one control-plane process per database
  (several processes would need a shared notification, such as PostgreSQL's LISTEN).
* **Bounded**: at most `max_entries` of each kind; a full cache stores nothing more (the
  request is answered from the database) and counts it in `refused`. Unknown tokens are
  never cached, so a caller guessing tokens cannot fill it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import event, inspect
from sqlalchemy.orm import Session, sessionmaker

from .db import Device, ModelVersion, Principal

__all__ = ["DesiredAnswer", "HotCache", "Identity"]

# Device columns a desired-state answer is made of.
_ANSWER_COLUMNS: Final = ("generation", "desired_model", "revoked_at")
_TOUCHED: Final = "edgefleet.hot.touched"


@dataclass(frozen=True)
class Identity:
    """A live principal, detached from any session."""

    id: int
    name: str
    role: str
    device_id: str | None

    @classmethod
    def of(cls, principal: Principal) -> Identity:
        return cls(principal.id, principal.name, principal.role, principal.device_id)


@dataclass(frozen=True)
class DesiredAnswer:
    """A device's desired state as sent: its ETag and JSON body. An answer holding a
    pre-signed artifact URL is served from memory only until `fresh_until` (monotonic)."""

    device: str
    generation: int
    revoked: bool
    body: bytes
    fresh_until: float = math.inf

    @property
    def etag(self) -> str:
        return f'"{self.generation}"'


@dataclass
class _Touched:
    devices: set[str]
    principals: bool = False
    models: bool = False


class HotCache:
    """Identities by token hash and desired-state answers by device (module doc)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._identities: dict[str, Identity] = {}
        self._answers: dict[str, DesiredAnswer] = {}
        self._epoch = 0
        self.hits = 0
        self.misses = 0
        self.refused = 0

    # --- reads --------------------------------------------------------------------------

    def epoch(self) -> int:
        return self._epoch

    def identity(self, token_sha256: str) -> Identity | None:
        found = self._identities.get(token_sha256)
        self._count(found is not None)
        return found

    def answer(self, device: str) -> DesiredAnswer | None:
        found = self._answers.get(device)
        if found is not None and time.monotonic() > found.fresh_until:
            found = None
        self._count(found is not None)
        return found

    def _count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    # --- stores (only when nothing changed since `epoch`) -------------------------------

    def put_identity(self, token_sha256: str, identity: Identity, epoch: int) -> None:
        self._put(self._identities, token_sha256, identity, epoch)

    def put_answer(self, answer: DesiredAnswer, epoch: int) -> None:
        self._put(self._answers, answer.device, answer, epoch)

    def _put(self, table: dict[str, Any], key: str, value: Any, epoch: int) -> None:
        with self._lock:
            if epoch != self._epoch:
                return
            if key not in table and len(table) >= self.max_entries:
                self.refused += 1
                return
            table[key] = value

    # --- invalidation -------------------------------------------------------------------

    def invalidate(self, devices: Iterable[str] = (), *, identities: bool = False,
                   answers: bool = False) -> None:
        """Drop the answers of `devices` (all answers with `answers`), and every identity
        with `identities`."""
        with self._lock:
            self._epoch += 1
            if identities:
                self._identities.clear()
            if answers:
                self._answers.clear()
            else:
                for device in devices:
                    self._answers.pop(device, None)

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Invalidate after every commit of `sessions` that changed what is cached."""
        event.listen(sessions, "before_flush", _record_changes)
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", _forget_changes)

    def _after_commit(self, session: Session) -> None:
        touched: _Touched | None = session.info.pop(_TOUCHED, None)
        if touched is not None:
            self.invalidate(touched.devices, identities=touched.principals,
                            answers=touched.models)


def _record_changes(session: Session, _flush_context: Any, _instances: Any) -> None:
    """Before a flush (while its history is readable): note what the cache must forget once
    the transaction commits."""
    touched: _Touched = session.info.setdefault(_TOUCHED, _Touched(set()))
    for obj in (*session.new, *session.dirty, *session.deleted):
        if isinstance(obj, Principal):
            touched.principals = True
        elif isinstance(obj, ModelVersion):
            touched.models = True
        elif isinstance(obj, Device):
            state = inspect(obj)
            if obj in session.new or obj in session.deleted or any(
                    state.attrs[name].history.has_changes() for name in _ANSWER_COLUMNS):
                touched.devices.add(obj.id)


def _forget_changes(session: Session) -> None:
    session.info.pop(_TOUCHED, None)
