"""aegis_ipc: call and serve services on an aegis-ipc bus (shared memory, one host).

    with aegis_ipc.Bus.connect() as bus:               # AEGIS_IPC_DIR or the default directory
        reply = bus.call("echo", "ping", b"hi", timeout=1.0)
        print(reply.payload, reply.instance_id)

    inst = bus.register("echo", "py-1", {"lang": "python"})
    inst.serve(lambda method, payload: payload)        # until inst.stop() or Ctrl-C

    reply = await bus.call_async("echo", "ping", b"hi")  # asyncio, through an event fd
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Iterable

from ._native import Bus as _NativeBus
from ._native import (
    BorrowedReply,
    EventFd,
    Instance,
    Loan,
    PendingCall,
    Reply,
    ReplyLoan,
    current_deadline,
    current_traceparent,
)
from .errors import (
    AegisError,
    BadRequest,
    BrokerUnavailable,
    CircuitOpen,
    Incompatible,
    InstanceConflict,
    InternalError,
    LimitExceeded,
    LoopDetected,
    MessageTooLarge,
    NoAvailableInstance,
    NotOwner,
    OwnerUnavailable,
    PermissionDenied,
    RemoteError,
    ResourceConflict,
    ResourceNotFound,
    ServiceError,
    Timeout,
)

__all__ = [
    "Bus",
    "Instance",
    "Reply",
    "PendingCall",
    "Loan",
    "BorrowedReply",
    "ReplyLoan",
    "AegisError",
    "BadRequest",
    "BrokerUnavailable",
    "CircuitOpen",
    "Incompatible",
    "InstanceConflict",
    "InternalError",
    "LimitExceeded",
    "LoopDetected",
    "MessageTooLarge",
    "NoAvailableInstance",
    "NotOwner",
    "OwnerUnavailable",
    "PermissionDenied",
    "RemoteError",
    "ResourceConflict",
    "ResourceNotFound",
    "ServiceError",
    "Timeout",
    "current_deadline",
    "current_traceparent",
]

# How often an async call whose instance's ring is full (or whose connection has every
# mailbox in use, by another loop or thread) tries again (seconds).
FULL_RING_RETRY = 0.001


class _LoopState:
    """One event loop's async calls on one connection: its own event fd (a loop reading a
    shared one would swallow the other loop's wake-ups), the calls it waits for, and a
    semaphore of the connection's mailboxes."""

    def __init__(self, bus: Bus, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fd: EventFd = bus._new_event_fd()
        self.waiting: dict[int, tuple[PendingCall, asyncio.Future[Reply]]] = {}
        self.slots = asyncio.Semaphore(bus.mailboxes)
        loop.add_reader(self.fd.fileno(), self._on_ready)

    def _on_ready(self) -> None:
        self.fd.clear()
        # The fd fires when an armed call is done and every few milliseconds while one is
        # not: each look settles what is done, past its deadline, or whose instance left.
        for key, (call, fut) in list(self.waiting.items()):
            if fut.done():  # cancelled: its task's `finally` cancels the call too
                del self.waiting[key]
                call.cancel()
                continue
            try:
                r = call.poll()
            except AegisError as e:
                del self.waiting[key]
                fut.set_exception(e)
                continue
            if r is not None:
                del self.waiting[key]
                fut.set_result(r)

    def close(self) -> None:
        def remove() -> None:
            self.loop.remove_reader(self.fd.fileno())
            for call, fut in self.waiting.values():
                call.cancel()
                if not fut.done():
                    fut.set_exception(BadRequest("the Bus was closed"))
            self.waiting.clear()

        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(remove)


class Bus(_NativeBus):
    """A connection to the bus. Thread-safe (any number of threads and event loops); the GIL
    is released while a call waits. Use as a context manager, or ``close()`` it."""

    @classmethod
    def connect(cls, dir: str | None = None, *, mailboxes: int | None = None) -> Bus:
        """Connects to the broker in ``dir`` (default: ``AEGIS_IPC_DIR``, ``/run/aegis-ipc``,
        ...). ``mailboxes`` is how many calls the connection can have in flight at once
        (default 128): sync calls, submitted calls and async calls of every loop share them."""
        return cls(dir, mailboxes)

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection handle (see the native ``close``) and the async state."""
        for st in self._loop_states().values():
            st.close()
        self.__dict__["_loops"] = {}
        super().close()

    def services(self) -> list[dict[str, Any]]:
        r: list[dict[str, Any]] = json.loads(self._services_json())
        return r

    def service(self, name: str) -> dict[str, Any]:
        r: dict[str, Any] = json.loads(self._service_json(name))
        return r

    def resources(self, service: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        r: dict[str, Any] = json.loads(self._resources_json(service, limit, offset))
        return r

    def _loop_states(self) -> dict[asyncio.AbstractEventLoop, _LoopState]:
        d = self.__dict__
        if "_loops_lock" not in d:
            d.setdefault("_loops_lock", threading.Lock())
        with d["_loops_lock"]:
            loops: dict[asyncio.AbstractEventLoop, _LoopState] = d.setdefault("_loops", {})
            return loops

    def _loop_state(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        states = self._loop_states()
        st = states.get(loop)
        if st is None or st.loop.is_closed():
            st = _LoopState(self, loop)
            with self.__dict__["_loops_lock"]:
                # Forget loops that have closed since.
                for old in [k for k in states if k.is_closed()]:
                    del states[old]
                states[loop] = st
        return st

    async def call_async(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        attempt_timeout: float | None = None,
        idempotent: bool = False,
        exclude: Iterable[str] = (),
    ) -> Reply:
        """Awaits a call without a thread: an event fd of this loop's is watched by the loop
        (``add_reader``), so thousands of calls can be in flight from one loop (as many at
        once as the connection has mailboxes; more wait their turn). One attempt, no
        failover; the call's deadline is the shorter of ``timeout`` and ``attempt_timeout``
        (5 s by default). Cancelling the task cancels the call and frees its mailbox."""
        loop = asyncio.get_running_loop()
        st = self._loop_state(loop)
        excluded = list(exclude)
        async with st.slots:
            # A full ring is waited for on the loop's timer, never inside the binding: the
            # loop stays free while the instance drains it. Each try routes the call anew.
            began = loop.time()
            while True:
                call = self._try_submit(
                    service,
                    method,
                    payload,
                    loop.time() - began,
                    timeout=timeout,
                    attempt_timeout=attempt_timeout,
                    idempotent=idempotent,
                    exclude=excluded,
                )
                if call is not None:
                    break
                await asyncio.sleep(FULL_RING_RETRY)
            fut: asyncio.Future[Reply] = loop.create_future()
            key = id(call)
            st.waiting[key] = (call, fut)
            call._arm(st.fd)
            try:
                return await fut
            finally:
                # Settled: a no-op. Cancelled (or the loop is going away): the request is
                # withdrawn if no instance took it, and its mailbox comes back now, not when
                # the task and its frame are collected.
                st.waiting.pop(key, None)
                call.cancel()
