"""Zero-copy from Python: a writable loan for the request, a memoryview of the reply where
the instance wrote it, and a writable reply loan on the serving side."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

import aegis_ipc

from conftest import DEADLINE


def _pull_server(inst: aegis_ipc.Instance, served: list[str]) -> threading.Thread:
    """Answers each request with a reply loan holding the request reversed."""

    def run() -> None:
        while True:
            got = inst.receive(timeout=DEADLINE)
            if got is None:
                return
            method, payload = got
            served.append(method)
            if method == "fail":
                inst.reply_error(418, "asked to fail")
                continue
            loan = inst.loan_reply(len(payload))
            with memoryview(loan) as m:
                m[:] = payload[::-1]
                if method == "early":
                    # Sending while a memoryview is open is refused; the request stays.
                    with pytest.raises(BufferError):
                        inst.reply_loan(loan)
            inst.reply_loan(loan)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@contextlib.contextmanager
def _zc_served(testbus) -> Iterator[tuple[aegis_ipc.Bus, list[str]]]:
    """A caller's connection, and `zc` served by `_pull_server` on another connection
    (stopped and joined on exit): yields the caller and the methods served so far."""
    bus = aegis_ipc.Bus.connect(testbus.dir)
    server = aegis_ipc.Bus.connect(testbus.dir)
    inst = server.register("zc", "py-1")
    served: list[str] = []
    t = _pull_server(inst, served)
    try:
        yield bus, served
    finally:
        inst.stop()
        t.join(DEADLINE)


def test_a_loaned_call_is_read_in_place_on_both_sides(testbus):
    with _zc_served(testbus) as (bus, served):
        for size in (1, 100, 4096, 1 << 20, 12 << 20):
            loan = bus.loan("zc", size)
            assert len(loan) == size
            data = bytes(i % 251 for i in range(min(size, 1000))) * (size // 1000 + 1)
            data = data[:size]
            with memoryview(loan) as m:
                assert not m.readonly and m.nbytes == size
                m[:] = data
                # An open memoryview keeps the loan from being sent.
                with pytest.raises(BufferError):
                    bus.call_loan("zc", "rev", loan, timeout=DEADLINE)
            reply = bus.call_loan("zc", "rev", loan, timeout=DEADLINE)
            with reply:
                assert len(reply) == size and reply.instance_id == "py-1" and reply.intact
                m = memoryview(reply)
                assert m.readonly
                with pytest.raises(TypeError):
                    m[0] = 1
                assert m == data[::-1]
                with pytest.raises(BufferError):
                    reply.release()
                m.release()
            # Spent: the loan cannot be sent again, the released reply shows nothing.
            with pytest.raises(aegis_ipc.BadRequest):
                bus.call_loan("zc", "rev", loan, timeout=DEADLINE)
            with pytest.raises(BufferError):
                memoryview(loan)
            with pytest.raises(aegis_ipc.BadRequest):
                reply.tobytes()
        # The reply of a copied request, read in place; an error answer raises as usual.
        with bus.call_view("zc", "early", b"abc", timeout=DEADLINE) as r:
            assert r.tobytes() == b"cba"
        loan = bus.loan("zc", 8)
        with pytest.raises(aegis_ipc.RemoteError) as e:
            bus.call_loan("zc", "fail", loan, timeout=DEADLINE)
        assert e.value.code == 418
        # Memory comes back: 8 rounds of 12 MiB through a channel's 32 MiB request heap, and loans
        # released unsent.
        for i in range(8):
            loan = bus.loan("zc", 12 << 20)
            memoryview(loan)[0:1] = bytes([i])
            with bus.call_loan("zc", "rev", loan, timeout=DEADLINE) as r:
                assert memoryview(r)[-1] == i
            bus.loan("zc", 12 << 20).release()
        with pytest.raises(aegis_ipc.MessageTooLarge):
            bus.loan("zc", 64 << 20)
        held = [bus.loan("zc", 12 << 20), bus.loan("zc", 12 << 20)]
        with pytest.raises(aegis_ipc.LimitExceeded):
            bus.loan("zc", 12 << 20)
        for h in held:
            h.release()
    assert served.count("rev") == 13


def test_a_loan_for_a_resource_goes_to_its_owner_and_is_read_in_place(testbus):
    bus = aegis_ipc.Bus.connect(testbus.dir)
    server = aegis_ipc.Bus.connect(testbus.dir)
    other = server.register("zc", "py-1")
    owner = server.register("zc", "py-2")
    owner.claim(["acct-7"])
    served: list[str] = []
    threads = [_pull_server(other, served), _pull_server(owner, served)]
    try:
        size = 256 << 10
        data = bytes(i % 251 for i in range(size))
        # Round-robin would alternate between the two: each goes to the owner.
        for _ in range(4):
            loan = bus.loan_resource("acct-7", size)
            with memoryview(loan) as m:
                m[:] = data
            with bus.call_resource_loan("acct-7", "rev", loan, timeout=DEADLINE) as r:
                assert r.instance_id == "py-2"
                assert memoryview(r) == data[::-1]
        with pytest.raises(aegis_ipc.ResourceNotFound):
            bus.loan_resource("acct-none", 8)
        # A loan goes only the way it was made for.
        with pytest.raises(aegis_ipc.BadRequest, match="call_resource_loan"):
            bus.call_loan("zc", "rev", bus.loan_resource("acct-7", 8), timeout=DEADLINE)
        with pytest.raises(aegis_ipc.BadRequest, match="loan_resource"):
            bus.call_resource_loan("acct-7", "rev", bus.loan("zc", 8), timeout=DEADLINE)
    finally:
        other.stop()
        owner.stop()
        for t in threads:
            t.join(DEADLINE)
    assert served == ["rev"] * 4


def test_loaned_requests_are_pipelined_and_read_in_place(testbus):
    with _zc_served(testbus) as (bus, served):
        size = 1 << 20
        calls = []
        for k in range(5):
            data = bytes((i + k) % 251 for i in range(size))
            loan = bus.loan("zc", size)
            with memoryview(loan) as m:
                m[:] = data
            calls.append((data, bus.submit_loan("zc", "rev", loan, timeout=DEADLINE)))
            # Spent: sent with the call.
            with pytest.raises(aegis_ipc.BadRequest):
                bus.submit_loan("zc", "rev", loan, timeout=DEADLINE)
        for data, call in calls[:4]:
            with call.result_view() as r:
                assert memoryview(r) == data[::-1]
            with pytest.raises(aegis_ipc.BadRequest):
                call.result_view()
        calls[4][1].cancel()
        # The one serving thread answers in order: once this is answered, the cancelled
        # call is settled and its block comes back; then 12 + 12 + 7 MiB of loans fit
        # the channel's 32 MiB request heap (a block not given back would fail the last).
        assert bus.call("zc", "rev", b"ab", timeout=DEADLINE).payload == b"ba"
        held = [bus.loan("zc", 12 << 20), bus.loan("zc", 12 << 20), bus.loan("zc", 7 << 20)]
        for h in held:
            h.release()
