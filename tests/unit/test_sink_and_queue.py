"""The agent's bounded ingest queue and the LocalSink's seq accounting."""

from __future__ import annotations

import asyncio
import gzip

from edgefleet.edge_agent.agent import IngestQueue
from edgefleet.edge_agent.sink import LocalSink, SeqRanges
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Batch, Quality, Reading, encode_binary, encode_json


def sample(i: int) -> Sample:
    return Sample("pump-01", "flow", 1_795_000_000_000_000_000 + i, float(i), Quality.GOOD)


def test_seq_ranges_merge_and_count_duplicates() -> None:
    ranges = SeqRanges()
    assert ranges.add(1, 10) == 0
    assert ranges.add(21, 30) == 0
    assert ranges.gaps() == [(11, 20)]
    assert ranges.add(5, 25) == 6 + 5  # 5..10 and 21..25 were there
    assert ranges.ranges == [(1, 30)] and ranges.count == 30 and ranges.gaps() == []
    assert ranges.add(40, 40) == 0 and ranges.gaps() == [(31, 39)] and ranges.highest == 40


def test_ingest_queue_put_waits_for_room_and_offer_refuses_when_full() -> None:
    async def main() -> None:
        queue = IngestQueue(max_samples=10)
        await queue.put([sample(i) for i in range(8)])
        assert queue.offer(sample(8)) and queue.offer(sample(9))
        assert not queue.offer(sample(10)) and queue.refused == 1
        blocked = asyncio.create_task(queue.put([sample(i) for i in range(11, 14)]))
        await asyncio.sleep(0.01)
        assert not blocked.done()  # a polled source waits; nothing it read is lost
        taken = await queue.take(max_samples=5)
        assert [s.ts_ns % 100 for s in taken] == [0, 1, 2, 3, 4]
        await asyncio.wait_for(blocked, 1)
        rest = queue.take_nowait(100)
        assert [s.ts_ns % 100 for s in rest] == [5, 6, 7, 8, 9, 11, 12, 13]
        assert len(queue) == 0

    asyncio.run(main())


def _batch(first: int, n: int) -> Batch:
    readings = tuple(Reading("edge-01", "pump-01", "flow", 1_795_000_000_000_000_000 + i,
                             float(i), Quality.GOOD, first + i) for i in range(n))
    return Batch(device="edge-01", first_seq=first, last_seq=first + n - 1, readings=readings,
                 sent_at=1_795_000_000_000_000_000)


def test_sink_decodes_binary_and_json_checks_tokens_and_counts_duplicates() -> None:
    sink = LocalSink(tokens={"edge-01": "s3cret"})
    good = {"Authorization": "Bearer s3cret", "Content-Type": "application/vnd.edgefleet.wire",
            "Content-Encoding": "gzip"}
    status, _, _ = sink.handle("/v1/ingest", good, gzip.compress(encode_binary(_batch(1, 5))))
    assert status == 202
    json_headers = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    status, _, _ = sink.handle("/v1/ingest", json_headers, encode_json(_batch(4, 4)))
    assert status == 202
    assert sink.rows == 7 and sink.duplicates == 2
    assert sink.received("edge-01").ranges == [(1, 7)]
    status, body, _ = sink.handle("/v1/ingest", {**good, "Authorization": "Bearer nope"},
                                  gzip.compress(encode_binary(_batch(8, 1))))
    assert status == 401 and b"token" in body
    status, body, _ = sink.handle("/v1/ingest", good, b"\x1f\x8b garbage")
    assert status == 400
    assert sink.rejected[401] == 1 and sink.rejected[400] == 1 and sink.rows == 7
