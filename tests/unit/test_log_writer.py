"""JSON log lines: coalesced per event-loop round, never held back longer, never lost."""

from __future__ import annotations

import asyncio
import threading

from entrypoints.logging_setup import LineWriter


class _Sink:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.flushes = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def flush(self) -> None:
        self.flushes += 1


def test_lines_of_one_loop_round_go_out_in_one_write_by_the_end_of_that_round() -> None:
    sink = _Sink()
    writer = LineWriter(sink)

    async def main() -> list[list[bytes]]:
        seen = []
        writer.info(b'{"n":1}')
        writer.warning(b'{"n":2}')
        seen.append(list(sink.writes))  # nothing yet: the round is not over
        await asyncio.sleep(0)
        seen.append(list(sink.writes))
        writer.info(b'{"n":3}')
        await asyncio.sleep(0)
        seen.append(list(sink.writes))
        return seen

    before, after_first, after_second = asyncio.run(main())
    assert before == []
    assert after_first == [b'{"n":1}\n{"n":2}\n']
    assert after_second == [b'{"n":1}\n{"n":2}\n', b'{"n":3}\n']
    assert sink.flushes == 2


def test_a_line_logged_outside_a_loop_or_off_its_thread_is_written_at_once() -> None:
    sink = _Sink()
    writer = LineWriter(sink)
    writer.info(b"outside")
    assert sink.writes == [b"outside\n"]

    async def main() -> None:
        writer.info(b"in loop")
        thread = threading.Thread(target=writer.info, args=(b"from a thread",))
        thread.start()
        thread.join()
        assert sink.writes[-1] == b"from a thread\n"

    asyncio.run(main())
    assert sink.writes == [b"outside\n", b"from a thread\n", b"in loop\n"]


def test_what_is_pending_when_the_loop_stops_is_written_by_flush() -> None:
    sink = _Sink()
    writer = LineWriter(sink)
    loop = asyncio.new_event_loop()
    try:
        loop.call_soon(writer.info, b"last words")
        loop.call_soon(loop.stop)
        loop.run_forever()  # stops in the round the line was logged: its flush was never run
    finally:
        loop.close()
    assert sink.writes == []
    writer.flush()
    assert sink.writes == [b"last words\n"]
    writer.info(b"after the loop closed")
    assert sink.writes[-1] == b"after the loop closed\n"
