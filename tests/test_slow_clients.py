"""Slow and idle clients (docs/reliability.md): 200 connections that trickle a body at one
byte a second or hold idle, while a normal client scores over the fake engine in a real
uvicorn. The normal client's p99 stays within 2x its unloaded p99, nothing is 5xx, and the
server cuts every slow or idle connection within its bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import ServerProcess, fake_server, running

READ_TIMEOUT_S = 2.0
KEEPALIVE_S = 1.0
MAX_IDLE = 40
PHASE_S = 4.0
SPACING_S = 0.01
BODY = json.dumps({"question": "Which one?", "options": ["alpha", "beta", "gamma"]}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("slow-clients")
    env = {
        "UFCAL_DB_PATH": str(logs / "slow.db"),
        "UFCAL_REQUEST_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
        "UFCAL_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S),
        "UFCAL_MAX_IDLE_CONNECTIONS": str(MAX_IDLE),
    }
    with running(fake_server(logs, "slow-clients", env), "/readyz", 30) as started:
        yield started


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def normal_client(base_url: str, statuses: Counter[int]) -> list[float]:
    """/score every SPACING_S for PHASE_S over one keep-alive connection; latencies."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        end = time.monotonic() + PHASE_S
        while time.monotonic() < end:
            started = time.perf_counter()
            reply = await client.post(
                "/score", content=BODY, headers={"content-type": "application/json"}
            )
            latencies.append(time.perf_counter() - started)
            statuses[reply.status_code] += 1
            await asyncio.sleep(SPACING_S)
    return latencies


RESET = 0  # the server closed while the client was still sending: TCP reset, reply lost


async def read_reply(reader: asyncio.StreamReader) -> tuple[int | None, bytes]:
    try:
        data = await reader.read()  # until the server closes
    except ConnectionResetError:
        return RESET, b""
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def trickler(host: str, port: int, stop: float, out: list[tuple[int | None, float]]) -> None:
    """Send headers, then the body a byte a second; reconnect whenever cut."""
    while time.monotonic() < stop:
        reader, writer = await asyncio.open_connection(host, port)
        opened = time.monotonic()
        head = (
            f"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(BODY)}\r\n\r\n"
        ).encode()
        writer.write(head)
        reply = asyncio.ensure_future(read_reply(reader))
        for byte in BODY:
            if reply.done() or time.monotonic() >= stop:
                break
            with contextlib.suppress(ConnectionError):  # cut by the server
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.wait({reply}, timeout=1.0)
        if not reply.done():
            writer.close()
            reply.cancel()
            return
        status, _ = await reply
        out.append((status, time.monotonic() - opened))
        writer.close()


async def idler(
    host: str, port: int, keep_alive: bool, out: list[tuple[int | None, float]]
) -> None:
    """Open a connection and send nothing, or one request and then nothing (keep-alive)."""
    reader, writer = await asyncio.open_connection(host, port)
    opened = time.monotonic()
    if keep_alive:
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
    try:
        status, _ = await asyncio.wait_for(read_reply(reader), timeout=PHASE_S + 5)
    except TimeoutError:
        status = -1  # never closed: the bound did not hold
    out.append((status, time.monotonic() - opened))
    writer.close()


async def loaded_round(server: ServerProcess, statuses: Counter[int]) -> tuple[float, float]:
    """One unloaded then one loaded phase; the normal client's p99 in each. Checks that
    every slow or idle connection was cut within its bound."""
    host, port = "127.0.0.1", server.port
    unloaded = await normal_client(server.base_url, statuses)
    stop = time.monotonic() + PHASE_S
    trickled: list[tuple[int | None, float]] = []
    idled: list[tuple[int | None, float]] = []
    kept: list[tuple[int | None, float]] = []
    attackers = [asyncio.create_task(trickler(host, port, stop, trickled)) for _ in range(100)]
    attackers += [asyncio.create_task(idler(host, port, False, idled)) for _ in range(50)]
    attackers += [asyncio.create_task(idler(host, port, True, kept)) for _ in range(50)]
    await asyncio.sleep(0.3)  # every attacker connected
    loaded = await normal_client(server.base_url, statuses)
    await asyncio.wait_for(asyncio.gather(*attackers), timeout=PHASE_S + 15)
    print(
        f"\nslow clients: normal p99 {p99(unloaded) * 1000:.1f} ms unloaded, "
        f"{p99(loaded) * 1000:.1f} ms with 200 slow/idle connections "
        f"(x{p99(loaded) / p99(unloaded):.2f}; {len(unloaded)}/{len(loaded)} requests); "
        f"trickled {Counter(s for s, _ in trickled)}, idle {Counter(s for s, _ in idled)}, "
        f"keep-alive {Counter(s for s, _ in kept)}"
    )
    # every slow request was cut (a JSON 408, unless the reset beat it) within the read bound
    cut = Counter(s for s, _ in trickled)
    assert trickled and set(cut) <= {408, RESET} and cut[408] > 0, cut
    assert all(t < READ_TIMEOUT_S + 1.0 for _, t in trickled)
    # a connection that never sends is closed (408) within the same bound
    assert len(idled) == 50 and all(s == 408 and t < READ_TIMEOUT_S + 1.0 for s, t in idled)
    # a kept-alive connection answered, then closed: at once beyond MAX_IDLE, else when idle
    assert len(kept) == 50 and all(s == 200 and t < KEEPALIVE_S + 2.0 for s, t in kept)
    return p99(unloaded), p99(loaded)


async def test_slow_and_idle_clients_do_not_hurt_a_normal_client(server: ServerProcess) -> None:
    """The p99 ratio is a latency measurement on a shared machine: a round whose ratio is
    over 2 is measured again (at most 3 rounds); every round must be free of 5xx and keep
    the bounds."""
    statuses: Counter[int] = Counter()
    await normal_client(server.base_url, Counter())  # warm up
    ratios = []
    for _ in range(3):
        unloaded, loaded = await loaded_round(server, statuses)
        ratios.append(loaded / unloaded)
        if ratios[-1] <= 2.0:
            break
    assert set(statuses) == {200}, statuses
    assert min(ratios) <= 2.0, ratios
