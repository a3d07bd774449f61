"""The control plane's in-memory hot path (cloud/control/hot.py): what a commit changes is
dropped, what it does not change is kept, a read racing a commit never stores an old
answer, and the cache is bounded."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import sessionmaker

from edgefleet.cloud.control.db import Device, Principal
from edgefleet.cloud.control.hot import DesiredAnswer, HotCache, Identity
from edgefleet.cloud.control.schema import connect, migrate


def _answer(device: str, generation: int) -> DesiredAnswer:
    return DesiredAnswer(device, generation, False, b"{}")


def _database(tmp_path: Path) -> tuple[sessionmaker, HotCache]:
    engine = connect(f"sqlite:///{tmp_path}/control.db")
    migrate(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions.begin() as db:
        for name in ("gw-1", "gw-2"):
            db.add(Device(id=name, labels={}, groups=[], generation=1, reported_generation=0,
                          state="enrolled", reason=""))
        db.add(Principal(name="gw-1", role="device", token_sha256="a" * 64, device_id="gw-1"))
    cache = HotCache()
    cache.watch(sessions)
    return sessions, cache


def test_a_committed_generation_change_drops_only_that_devices_answer(tmp_path: Path) -> None:
    sessions, cache = _database(tmp_path)
    for name in ("gw-1", "gw-2"):
        cache.put_answer(_answer(name, 1), cache.epoch())
    with sessions.begin() as db:
        device = db.get(Device, "gw-1")
        assert device is not None
        device.generation = Device.generation + 1
        other = db.get(Device, "gw-2")
        assert other is not None
        other.last_seen = 123.0  # polled: not part of the answer
    assert cache.answer("gw-1") is None
    assert cache.answer("gw-2") == _answer("gw-2", 1)


def test_a_rolled_back_change_drops_nothing(tmp_path: Path) -> None:
    sessions, cache = _database(tmp_path)
    cache.put_answer(_answer("gw-1", 1), cache.epoch())
    with sessions() as db:
        device = db.get(Device, "gw-1")
        assert device is not None
        device.desired_model = "m/2"
        db.flush()
        db.rollback()
    assert cache.answer("gw-1") == _answer("gw-1", 1)


def test_any_principal_change_drops_every_identity(tmp_path: Path) -> None:
    sessions, cache = _database(tmp_path)
    cache.put_identity("a" * 64, Identity(1, "gw-1", "device", "gw-1"), cache.epoch())
    with sessions.begin() as db:
        principal = db.get(Principal, 1)
        assert principal is not None
        principal.revoked_at = 1.0
    assert cache.identity("a" * 64) is None


def test_a_read_that_raced_a_commit_is_not_stored(tmp_path: Path) -> None:
    sessions, cache = _database(tmp_path)
    epoch = cache.epoch()  # a loader starts reading generation 1 ...
    with sessions.begin() as db:  # ... a writer commits generation 2 meanwhile ...
        device = db.get(Device, "gw-1")
        assert device is not None
        device.generation = 2
    cache.put_answer(_answer("gw-1", 1), epoch)  # ... and the old answer is not kept
    assert cache.answer("gw-1") is None
    cache.put_answer(_answer("gw-1", 2), cache.epoch())
    assert cache.answer("gw-1") == _answer("gw-1", 2)


def test_a_full_cache_stores_nothing_more_and_counts_it() -> None:
    cache = HotCache(max_entries=2)
    for number in range(5):
        cache.put_answer(_answer(f"gw-{number}", 1), cache.epoch())
    assert (cache.answer("gw-0"), cache.answer("gw-1")) == (_answer("gw-0", 1),
                                                            _answer("gw-1", 1))
    assert cache.answer("gw-4") is None
    assert cache.refused == 3
    cache.put_answer(_answer("gw-0", 2), cache.epoch())  # an update of a kept key is fine
    assert cache.answer("gw-0") == _answer("gw-0", 2)
