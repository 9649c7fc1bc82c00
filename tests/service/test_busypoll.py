"""Busy polling (CAPSA_BUSY_POLL_US): the worker's polling read and the event loop's poller behave like the plain
blocking read and the plain loop, only without sleeping; a server with it on answers exactly as one without."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.batching import Batcher
from service.busypoll import LoopPoller, recv_into_polling
from service.cli import parse_args
from service.metrics import Metrics
from service.settings import Settings
from service.workers import Outputs
from tests.service.conftest import ServerProcess, expected


def test_polling_read_returns_what_is_there_and_leaves_the_socket_blocking() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"frame")
        buffer = bytearray(16)
        assert recv_into_polling(b, memoryview(buffer), 0.5) == 5 and bytes(buffer[:5]) == b"frame"
        assert b.getblocking()


@pytest.mark.parametrize("window_s", [0.0, 0.001])
def test_polling_read_falls_back_to_blocking_after_its_window(window_s: float) -> None:
    """Nothing arrives within the window: the read blocks until data does (sent by a thread once the reader has
    started), then sees the peer's close as end of stream."""
    a, b = socket.socketpair()
    started = threading.Event()

    def peer() -> None:
        started.wait(10)
        deadline = time.perf_counter() + window_s
        while time.perf_counter() < deadline:  # past the window: the reader is (or will be) in its blocking read
            pass
        a.sendall(b"late")
        a.close()

    sender = threading.Thread(target=peer)
    sender.start()
    with b:
        buffer = bytearray(16)
        started.set()
        got = recv_into_polling(b, memoryview(buffer), window_s)
        sender.join(10)
        assert bytes(buffer[:got]) == b"late"
        assert recv_into_polling(b, memoryview(buffer), window_s) == 0  # end of stream
        assert b.getblocking()


def test_polling_read_raises_like_recv_into_on_a_closed_socket() -> None:
    a, b = socket.socketpair()
    a.close()
    b.close()
    with pytest.raises(OSError):
        recv_into_polling(b, memoryview(bytearray(4)), 0.01)


def test_loop_poller_polls_for_its_window_after_the_last_touch_then_stops() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        poller = LoopPoller.of(loop, 0.002)
        assert LoopPoller.of(loop, 0.001) is poller and poller.window_s == 0.002  # one per loop, widest window
        assert not poller.active
        poller.touch()
        assert poller.active
        touched = poller.last
        deadline = time.monotonic() + 10
        while poller.active and time.monotonic() < deadline:
            await asyncio.sleep(0)  # lets the poller's callback run; the loop never blocks while it is scheduled
        assert not poller.active, "the poller never stopped"
        assert time.perf_counter() - touched >= poller.window_s
        poller.touch()  # and starts again on the next touch
        assert poller.active

    asyncio.run(scenario())


def test_loop_poller_refuses_a_window_that_is_not_positive() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="busy-poll window must be positive"):
            LoopPoller(loop, 0.0)
    finally:
        loop.close()


class _Worker:
    def __init__(self) -> None:
        self.id = 1
        self.sent: list[tuple[int, np.ndarray]] = []

    def send_batch(self, batch_id: int, array: np.ndarray, offsets: list[int]) -> None:
        self.sent.append((batch_id, array))


def test_the_batcher_keeps_the_loop_polling_while_and_just_after_a_batch_runs() -> None:
    async def scenario() -> None:
        kw: dict[str, Any] = {"max_batch_size": 4, "max_batch_delay_s": 0.0, "max_queue_size": 8, "timeout_s": 5.0}
        plain = Batcher(metrics=Metrics().for_version("p", 1), **kw)
        assert plain._poller is None  # off by default
        batcher = Batcher(metrics=Metrics().for_version("m", 1), busy_poll_s=0.05, **kw)
        poller = batcher._poller
        assert poller is not None and not poller.active
        worker = _Worker()
        batcher.add_worker(worker)
        future = batcher.submit(np.ones((1, 2), np.float32))
        assert poller.active  # the batch went out: poll for its answer
        sent_at = poller.last
        batch_id, array = worker.sent[-1]
        batcher.complete(worker, batch_id, 0.001, Outputs(array * 2, array.copy(), array[:, 0].copy()))
        assert poller.last >= sent_at  # answered: keep polling for the next request
        assert (await future)[0].tolist() == [[2.0, 2.0]]

    asyncio.run(scenario())


def test_the_setting_is_checked_and_reaches_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().busy_poll_us == 0
    monkeypatch.setenv("CAPSA_BUSY_POLL_US", "-1")
    with pytest.raises(ValidationError, match="busy_poll_us"):
        Settings()
    monkeypatch.setenv("CAPSA_BUSY_POLL_US", "2000000")
    with pytest.raises(ValidationError, match="busy_poll_us"):
        Settings()
    monkeypatch.delenv("CAPSA_BUSY_POLL_US")
    assert parse_args(["--busy-poll-us", "500"])["busy_poll_us"] == 500


def test_a_busy_polling_server_answers_as_the_model_does(registry: dict[str, Any], reference: dict[str, Any],
                                                          tmp_path: Path) -> None:
    """A real server with CAPSA_BUSY_POLL_US: one client after another (each answer arrives while the worker and the
    loop poll) and concurrent clients get the model's own rows; its workers report the window."""
    proc = ServerProcess(registry["root"], tmp_path / "server.log", env={"CAPSA_BUSY_POLL_US": "3000"})
    try:
        proc.wait_ready()
        x = np.random.default_rng(7).standard_normal((24, 4)).astype(np.float32)
        want_y, want_risk, _ = expected(reference["vote"], x)

        def infer(client: httpx.Client, i: int) -> tuple[list[float], list[float]]:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": x[i].tolist()}]}
            r = client.post(f"{proc.url}/v2/models/vote/infer", json=body, timeout=30)
            assert r.status_code == 200, r.text
            out = {o["name"]: o["data"] for o in r.json()["outputs"]}
            return out["prediction"], out["risk"]

        with httpx.Client() as client:
            for i in range(12):
                y, risk = infer(client, i)
                np.testing.assert_allclose(y, want_y[i], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(risk, want_risk[i], rtol=1e-5, atol=1e-6)
        results: dict[int, tuple[list[float], list[float]]] = {}

        def client_thread(i: int) -> None:
            with httpx.Client() as client:
                results[i] = infer(client, i)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(12, 24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(12, 24))
        for i, (y, risk) in results.items():
            np.testing.assert_allclose(y, want_y[i], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(risk, want_risk[i], rtol=1e-5, atol=1e-6)
        ready = [e for e in proc.log_entries() if e.get("msg") == "worker ready"]
        assert ready and all(e["busy_poll_us"] == 3000 for e in ready)
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


def test_a_front_end_polls_while_its_forwarded_requests_are_out() -> None:
    """A secondary front end (CAPSA_HTTP_PROCESSES > 1) touches its loop's poller when it forwards a request to the
    main process and when the answer comes back; without the setting it has no poller."""
    from service.frontends.messages import Forwarded
    from service.frontends.secondary import PrimaryLink

    class Channel:
        open = True

        def send(self, message: object) -> None:
            pass

        def later(self, key: object, item: object, flush: object) -> None:
            pass

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        plain = PrimaryLink(1, Metrics())
        assert plain._poller is None
        link = PrimaryLink(1, Metrics(), busy_poll_s=0.05)
        link.channel = Channel()  # type: ignore[assignment]
        link._poller = LoopPoller.of(loop, link.busy_poll_s)  # what connect() does once connected
        future = link.forward("m", 1, np.ones((1, 2), np.float32), timeout_s=5.0)
        assert link._poller.active
        sent_at = link._poller.last
        z = np.zeros((1, 1), np.float32)
        link._received(link.channel, Forwarded((1,), Outputs(z, z, z[:, 0]), (0, 1)))  # type: ignore[arg-type]
        assert link._poller.last >= sent_at
        assert (await future)[0].tolist() == [[0.0]]

    asyncio.run(scenario())
