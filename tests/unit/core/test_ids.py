"""Ids for leases, requests and audit rows: unique, UUID-shaped, and never repeated by a fork."""

from __future__ import annotations

import os
import uuid

from gateway_core.ids import new_id


def test_ids_are_unique_and_parse_as_uuids() -> None:
    ids = [new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and uuid.UUID(i).hex == i for i in ids[:100])


def test_a_forked_child_does_not_repeat_its_parent() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next id, exit at once
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    parent = new_id()
    assert len(child) == 32
    assert child[:16] != parent[:16]
