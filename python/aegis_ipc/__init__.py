"""aegis_ipc: call and serve services on an aegis-ipc bus (shared memory, one host).

    bus = aegis_ipc.Bus.connect()                      # AEGIS_IPC_DIR or the default directory
    reply = bus.call("echo", "ping", b"hi", timeout=1.0)
    print(reply.payload, reply.instance_id)

    inst = bus.register("echo", "py-1", {"lang": "python"})
    inst.serve(lambda method, payload: payload)        # until inst.stop()

    reply = await bus.call_async("echo", "ping", b"hi")  # asyncio, through the event fd
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Iterable

from . import errors
from ._native import Bus as _NativeBus
from ._native import Instance, PendingCall, Reply
from .errors import *  # noqa: F401,F403  (the exception classes)
from .errors import AegisError, LimitExceeded, ServiceError

__all__ = ["Bus", "Instance", "Reply", "PendingCall", "AegisError", "ServiceError"] + [
    n for n in dir(errors) if n[0].isupper()
]

# How often an async call whose instance's ring is full tries again (seconds).
FULL_RING_RETRY = 0.001


class Bus(_NativeBus):
    """A connection to the bus. Thread-safe; the GIL is released while a call waits."""

    @classmethod
    def connect(cls, dir: str | None = None, *, mailboxes: int | None = None) -> "Bus":
        return cls(dir, mailboxes)

    def services(self) -> list[dict[str, Any]]:
        return json.loads(self._services_json())

    def service(self, name: str) -> dict[str, Any]:
        return json.loads(self._service_json(name))

    def resources(self, service: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        return json.loads(self._resources_json(service, limit, offset))

    async def call_async(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        exclude: Iterable[str] = (),
    ) -> Reply:
        """Awaits a call without a thread: the bus's event fd is watched by the running
        loop (``add_reader``), so thousands of calls can be in flight from one loop (as
        many at once as the connection has mailboxes; more wait their turn)."""
        loop = asyncio.get_running_loop()
        state = self.__dict__.get("_async")
        if state is None or state[0] is not loop:
            state = (loop, asyncio.Semaphore(self.mailboxes), [])
            self.__dict__["_async"] = state
            fd = self.event_fd()
            loop.add_reader(fd, self._on_event_fd, fd, state[2])
        _, slots, waiting = state
        async with slots:
            # A full ring is waited for on the loop's timer, never inside the binding: the
            # loop stays free while the instance drains it. Each try routes the call anew.
            began = loop.time()
            while True:
                call = self._try_submit(
                    service, method, payload, loop.time() - began,
                    timeout=timeout, idempotent=idempotent, exclude=list(exclude),
                )
                if call is not None:
                    break
                await asyncio.sleep(FULL_RING_RETRY)
            fut: asyncio.Future[Reply] = loop.create_future()
            waiting.append((call, fut))
            self._settle(waiting)
            return await fut

    @staticmethod
    def _on_event_fd(fd: int, waiting: list) -> None:
        try:
            os.read(fd, 8)
        except BlockingIOError:
            pass
        Bus._settle(waiting)

    @staticmethod
    def _settle(waiting: list) -> None:
        still = []
        for call, fut in waiting:
            if fut.done():
                continue
            if not call.ready():
                still.append((call, fut))
                continue
            try:
                fut.set_result(call.result())
            except AegisError as e:
                fut.set_exception(e)
        waiting[:] = still


_ = LimitExceeded
