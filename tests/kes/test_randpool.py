"""kes.randpool: random bytes without a syscall per request, never repeated across fork."""

from __future__ import annotations

import os

from kes import randpool
from kes.randpool import RandomPool


def test_pieces_are_distinct_and_the_pool_refills() -> None:
    pool = RandomPool(size=256)
    pieces = [pool.take(60) for _ in range(40)]  # 40 * 60 bytes: several refills
    assert len(set(pieces)) == len(pieces)
    assert all(len(p) == 60 for p in pieces)
    assert pool.refills >= 40 * 60 // 256


def test_taken_bytes_are_wiped_from_the_pool() -> None:
    pool = RandomPool(size=256)
    piece = pool.take(32)
    assert pool._buf is not None
    view = bytes(pool._buf.view)
    assert piece not in view
    assert view[:32] == bytes(32)


def test_large_requests_bypass_the_pool() -> None:
    pool = RandomPool(size=256)
    assert len(pool.take(1000)) == 1000
    assert pool.refills == 0


def test_a_forked_child_never_hands_out_what_the_parent_could() -> None:
    # The module's own pool, as the KES workers use it: draw once so the pool is full,
    # then fork; the child's next bytes must not be the parent's next bytes.
    randpool.random_bytes(8)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.write(w, randpool.random_bytes(32))
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    parent = randpool.random_bytes(32)
    # Not the parent's next bytes, and not the zeros MADV_WIPEONFORK left in the copy.
    assert len(child) == 32 and child != parent and child != bytes(32)
