"""The Python package against a real broker: calls both ways between Python and Rust,
every error class where it should be raised, resources, pull-style serving, watch, and
1,000 concurrent asyncio calls from one event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

import aegis_ipc
from aegis_ipc import errors


def serve_in_thread(inst: aegis_ipc.Instance, handler) -> threading.Thread:
    t = threading.Thread(target=inst.serve, args=(handler,), daemon=True)
    t.start()
    return t


def test_a_python_caller_calls_a_rust_instance(testbus):
    testbus.serve("echo", "rust-1")
    bus = aegis_ipc.Bus.connect(testbus.dir)
    for i in range(200):
        r = bus.call("echo", "ping", b"x" * i, timeout=5.0)
        assert r.payload == b"x" * i
        assert r.instance_id == "rust-1"
    assert [s["name"] for s in bus.services()] == ["echo"]
    assert bus.service("echo")["instances"][0]["id"] == "rust-1"


def test_a_rust_caller_calls_a_python_instance(testbus):
    bus = aegis_ipc.Bus.connect(testbus.dir)
    inst = bus.register("pyecho", "py-1", {"lang": "python"})
    t = serve_in_thread(inst, lambda method, payload: method.encode() + b":" + payload)
    out = testbus.aegisctl("call", "pyecho", "hello", "--data", "world", "--json")
    assert out.returncode == 0, out.stderr
    assert '"reply":"hello:world"' in out.stdout and '"instance_id":"py-1"' in out.stdout
    info = bus.service("pyecho")
    assert info["instances"][0]["metadata"] == [["lang", "python"]]
    inst.stop()
    t.join(10)
    assert not t.is_alive()
    inst.unregister()


def test_handler_errors_reach_the_caller(testbus):
    bus = aegis_ipc.Bus.connect(testbus.dir)
    inst = bus.register("h", "h-1")

    def handler(method: str, payload: bytes):
        if method == "raise":
            raise ValueError("kaboom")
        if method == "code":
            raise aegis_ipc.ServiceError(418, "teapot")
        if method == "notbytes":
            return 42
        return payload

    serve_in_thread(inst, handler)
    with pytest.raises(errors.RemoteError) as e:
        bus.call("h", "raise", b"")
    assert e.value.code == 500 and "kaboom" in str(e.value)
    with pytest.raises(errors.RemoteError) as e:
        bus.call("h", "code", b"")
    assert e.value.code == 418 and "teapot" in str(e.value)
    with pytest.raises(errors.RemoteError) as e:
        bus.call("h", "notbytes", b"")
    assert "handler returned int, not bytes" in str(e.value)
    # The instance kept serving.
    assert bus.call("h", "ok", b"fine").payload == b"fine"
    inst.stop()


@pytest.mark.parametrize("testbus", [["--max-message", "4096", "--max-resources-per-instance", "2"]], indirect=True)
def test_every_error_class_where_it_belongs(testbus, tmp_path):
    with pytest.raises(errors.BrokerUnavailable) as e:
        aegis_ipc.Bus.connect(str(tmp_path))
    assert e.value.code == 502
    bus = aegis_ipc.Bus.connect(testbus.dir)
    testbus.serve("echo", "e-1")
    testbus.serve("slow", "s-1", "--delay-ms", "2000")
    testbus.serve("docs", "d-1", "--claim", "doc-1")
    cases = [
        (errors.NoAvailableInstance, 503, lambda: bus.call("nobody", "m", b"")),
        (errors.Timeout, 504, lambda: bus.call("slow", "m", b"", timeout=0.2)),
        (errors.BadRequest, 400, lambda: bus.call("bad name", "m", b"")),
        (errors.MessageTooLarge, 413, lambda: bus.call("echo", "m", b"x" * 5000)),
        (errors.ResourceNotFound, 404, lambda: bus.call_resource("doc-404", "m", b"")),
    ]
    for cls, code, f in cases:
        with pytest.raises(cls) as e:
            f()
        assert e.value.code == code, (cls, e.value)
        assert isinstance(e.value, aegis_ipc.AegisError)
    mine = bus.register("docs", "d-2")
    with pytest.raises(errors.ResourceConflict) as e:
        mine.claim(["doc-1"])
    assert e.value.code == 409 and "d-1" in str(e.value)
    with pytest.raises(errors.NotOwner) as e:
        mine.release(["doc-1"])
    assert e.value.code == 403
    with pytest.raises(errors.LimitExceeded) as e:
        mine.claim(["a", "b", "c"])
    assert e.value.code == 429
    with pytest.raises(errors.InstanceConflict) as e:
        bus.register("echo", "e-1")
    assert e.value.code == 409
    with pytest.raises(ValueError):
        bus.call("echo", "m", b"", timeout=-1)


def test_resources_claim_route_transfer_release(testbus):
    bus = aegis_ipc.Bus.connect(testbus.dir)
    a = bus.register("docs", "a")
    b = bus.register("docs", "b")
    serve_in_thread(a, lambda m, p: b"a")
    serve_in_thread(b, lambda m, p: b"b")
    a.claim(["doc-1", "doc-2"])
    assert bus.call_resource("doc-1", "get", b"").instance_id == "a"
    a.transfer(["doc-1"], "docs", "b", "rebalance")
    r = bus.call_resource("doc-1", "get", b"")
    assert (r.instance_id, r.payload) == ("b", b"b")
    page = bus.resources("docs")
    assert {i["id"]: i["instance_id"] for i in page["items"]} == {"doc-1": "b", "doc-2": "a"}
    a.release(["doc-2"])
    with pytest.raises(errors.ResourceNotFound):
        bus.call_resource("doc-2", "get", b"")
    a.stop()
    b.stop()


def test_pull_style_receive_and_reply(testbus):
    bus = aegis_ipc.Bus.connect(testbus.dir)
    inst = bus.register("pull", "p-1")
    assert inst.receive(timeout=0.05) is None
    caller = aegis_ipc.Bus.connect(testbus.dir)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=caller.call("pull", "sum", b"\x01\x02")))
    t.start()
    method, payload = inst.receive(timeout=10)
    assert (method, payload) == ("sum", b"\x01\x02")
    inst.reply(bytes([sum(payload)]))
    t.join(10)
    assert result["r"].payload == b"\x03"
    with pytest.raises(ValueError):
        inst.reply(b"again")


def test_watch_wakes_on_a_new_instance(testbus):
    bus = aegis_ipc.Bus.connect(testbus.dir)
    seen = bus.watch("w", 0, timeout=0.01)
    got = {}
    t = threading.Thread(target=lambda: got.update(g=bus.watch("w", seen, timeout=20)))
    t.start()
    testbus.serve("w", "w-1")
    t.join(25)
    assert got["g"] != seen


def test_a_thousand_concurrent_asyncio_calls_from_one_loop(testbus):
    testbus.serve("echo", "e-1")
    testbus.serve("echo", "e-2")
    bus = aegis_ipc.Bus.connect(testbus.dir)

    async def main():
        replies = await asyncio.gather(*(bus.call_async("echo", "m", str(i).encode(), timeout=20) for i in range(1000)))
        return replies

    replies = asyncio.run(main())
    assert [r.payload for r in replies] == [str(i).encode() for i in range(1000)]
    assert {r.instance_id for r in replies} == {"e-1", "e-2"}

    async def failing():
        await bus.call_async("nobody", "m", b"")

    with pytest.raises(errors.NoAvailableInstance):
        asyncio.run(failing())


def test_a_full_ring_does_not_block_the_event_loop(testbus):
    import signal
    import time

    inst = testbus.serve("tight", "t-1", "--slot-count", "4")
    bus = aegis_ipc.Bus.connect(testbus.dir)
    bus.call("tight", "m", b"warm")
    inst.send_signal(signal.SIGSTOP)
    end = time.monotonic() + 30
    while open(f"/proc/{inst.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < end, "the instance did not stop"
        time.sleep(0.001)

    async def main():
        calls = [asyncio.ensure_future(bus.call_async("tight", "m", bytes([i]), timeout=20)) for i in range(16)]
        await asyncio.sleep(0)  # every call tries the ring: 4 fit, 12 find it full
        t = time.monotonic()
        await asyncio.sleep(0.02)
        # A loop blocked inside a submit would hold this timer up for the calls' 20 s.
        held = time.monotonic() - t
        inst.send_signal(signal.SIGCONT)
        return held, await asyncio.gather(*calls)

    try:
        held, replies = asyncio.run(main())
    finally:
        inst.send_signal(signal.SIGCONT)
    assert held < 5, f"the event loop was blocked for {held:.1f} s"
    assert [r.payload for r in replies] == [bytes([i]) for i in range(16)]


def test_owner_unavailable_when_the_owner_is_stopped(testbus):
    import signal

    owner = testbus.serve(
        "docs", "d-1", "--claim", "doc-1", "--heartbeat-interval-ms", "20", "--heartbeat-timeout-ms", "100"
    )
    bus = aegis_ipc.Bus.connect(testbus.dir)
    assert bus.call_resource("doc-1", "get", b"x").instance_id == "d-1"
    owner.send_signal(signal.SIGSTOP)
    try:
        seen = 0
        while True:  # until the broker marks it Unhealthy (its watch wakes us)
            seen = bus.watch("docs", seen, timeout=5.0)
            if bus.service("docs")["instances"][0]["status"] != "Online":
                break
        with pytest.raises(errors.OwnerUnavailable) as e:
            bus.call_resource("doc-1", "get", b"x")
        assert e.value.code == 503 and "d-1" in str(e.value)
    finally:
        owner.send_signal(signal.SIGCONT)


def test_permission_denied_names_the_policy_rule(testbus, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text('admin_uids = []\n\n[[policy]]\nservices = ["locked.*"]\n')
    locked = type(testbus)(["--config", str(config)])
    try:
        bus = aegis_ipc.Bus.connect(locked.dir)
        with pytest.raises(errors.PermissionDenied) as e:
            bus.register("locked.db", "x")
        assert e.value.code == 403 and "policy rule 1" in str(e.value)
        bus.register("open.db", "x").unregister()  # no rule: the broker's own uid may
    finally:
        locked.close()


def test_a_loop_of_nested_calls_ends_in_loop_detected(testbus):
    """A handler's calls are nested calls (one hop further, same trace): a service that
    calls itself is stopped at the hop limit (8) with LoopDetected."""
    bus = aegis_ipc.Bus.connect(testbus.dir)
    inst = bus.register("loop", "l-1")
    seen = []

    def handler(method: str, payload: bytes) -> bytes:
        depth = int(payload)
        try:
            return bus.call("loop", "again", str(depth + 1).encode(), timeout=10).payload
        except errors.LoopDetected as e:
            seen.append((depth, e.code))
            return b"stopped at %d" % depth

    for _ in range(10):
        serve_in_thread(inst, handler)
    r = bus.call("loop", "start", b"0", timeout=20)
    assert r.payload == b"stopped at 8"
    assert seen == [(8, 508)]
    inst.stop()
