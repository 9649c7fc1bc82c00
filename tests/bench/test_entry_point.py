"""The benchmark entry point without running a benchmark: argument parsing, the report writers on canned
measurements, wrk output parsing, the bare floor app. No timing is asserted anywhere (speed belongs in bench/)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from bench import harness, report
from bench.__main__ import parser
from bench.floors import ANSWER, bare_app, fastapi_app
from bench.harness import Column, Request
from bench.serve import CONCURRENCY, aggregate


def test_serve_arguments_parse() -> None:
    args = parser().parse_args(["serve", "--quick", "--peers", "--out", "x", "--concurrency", "1,8",
                                "--capsa-env", "CAPSA_TORCH_THREADS=2"])
    assert (args.command, args.quick, args.peers, args.out, args.concurrency) == ("serve", True, True, Path("x"),
                                                                                  (1, 8))
    assert args.capsa_env == ["CAPSA_TORCH_THREADS=2"]
    defaults = parser().parse_args(["serve"])
    assert defaults.concurrency == CONCURRENCY == (1, 32, 128)
    assert not defaults.peers and not defaults.cnn and defaults.samples == 1


def test_columns_carry_the_requested_samples() -> None:
    from bench.serve import columns

    by = {col.name: col for col in columns([], samples=8)}
    assert json.loads(by["v2-json"].request.body)["inputs"][0]["shape"] == [8, 64]  # type: ignore[union-attr]
    assert len(json.loads(by["v1"].request.body)["instances"]) == 8  # type: ignore[union-attr]
    assert by["v2-binary"].request.headers["Content-Type"] == "application/octet-stream"  # type: ignore[union-attr]
    assert by["grpc"].floor == "floor-grpc" and by["v2-json"].floor == "floor-asgi"
    assert "v2-json-poll" not in by  # the busy-polling server's columns only when asked for


def test_busy_poll_columns_go_to_the_second_server_and_get_their_own_targets() -> None:
    from bench.serve import columns

    assert parser().parse_args(["serve"]).busy_poll_us == 2000
    assert parser().parse_args(["serve", "--busy-poll-us", "0"]).busy_poll_us == 0
    by = {col.name: col for col in columns([], busy_poll_us=500)}
    assert (by["v2-json-poll"].server, by["v2-binary-poll"].server) == ("capsa-poll", "capsa-poll")
    assert by["v2-json-poll"].label == "capsa V2 JSON, busy-poll 0.5 ms" and by["v2-json-poll"].floor == "floor-asgi"
    floor = Column("floor-asgi", "f", "floor-asgi", "wrk", Request("/", b"", {}))
    points = [aggregate(floor, 1, [_round(1000.0, 0.1, 0.3)])]
    for col, p50, rps in ((by["v2-json"], 0.6, 500.0), (by["v2-json-poll"], 0.3, 800.0),
                          (by["v2-binary-poll"], 0.3, 900.0)):
        points.append(aggregate(col, 1, [_round(rps, p50, 1.0, samples=1.0, batches=1.0)]))
    found = report.targets(points, None)
    assert "FAIL: V2 JSON p50 at c=1 is the floor's + 0.50 ms (<= 0.25)" in found
    assert "PASS: V2 JSON (busy-poll) p50 at c=1 is the floor's + 0.20 ms (<= 0.25)" in found
    assert "PASS: binary (busy-poll) at c=1 is 1.12x JSON's req/s (>= 1)" in found


def test_unknown_subcommand_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["serve-fast"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def _round(rps: float, p50: float, p99: float, **extra: float) -> dict[str, float]:
    return {"rps": rps, "p50": p50, "p99": p99, "requests": rps * 2, "duration": 2.0, "client_cpu_s": 1.0,
            "server_cpu_s": 0.5, "errors": 0.0, **extra}


def canned() -> dict[str, object]:
    """A run's result as serve.run builds it, from made-up rounds."""
    floor = Column("floor-asgi", "bare ASGI floor", "floor-asgi", "wrk", Request("/", b"{}", {}))
    capsa = Column("v2-json", "capsa V2 JSON", "capsa", "wrk", Request("/", b"{}", {}), model="mlp")
    binary = Column("v2-binary", "capsa V2 binary", "capsa", "wrk", Request("/", b"{}", {}), model="mlp")
    points = []
    for c in (1, 32):
        points.append(aggregate(floor, c, [_round(1000.0 * c, 0.1, 0.3), _round(1200.0 * c, 0.2, 0.5)]))
        for col, scale in ((capsa, 0.6), (binary, 0.5)):
            points.append(aggregate(col, c, [_round(scale * 1000 * c, 0.3, 4.0, samples=60.0, batches=10.0,
                                                    answered=60.0, in_server_s=0.012, compute_s=0.001)]))
    for p in points:
        p["vs_floor"] = p["rps"] / next(q["rps"] for q in points if q["column"] == "floor-asgi" and q["c"] == p["c"])
    cnn = {"ratio": 0.9, "cpu_ratio": 0.95, "served_images_per_s": 900.0, "inprocess_images_per_s": 1000.0,
           "mean_batch": 48.0,
           "worker_torch_threads": 1, "device": "cpu", "images_per_request": 8, "concurrency": 16,
           "worker_cores": 0.9, "front_end_cores": 0.2, "client_cores": 0.1, "rounds": []}
    meta = {"command": "python -m bench serve --quick", "machine": "test box", "date": "2026-12-04",
            "load_before": "1.00/1.00/1.00", "load_after": "1.00/1.00/1.00", "rounds": 2, "duration": 2.0,
            "wrk_threads": 1, "grpc_processes": 2}
    return {"meta": meta, "points": points, "cnn": cnn, "unavailable": {"ray-serve": "pip install failed: x"},
            "targets": report.targets(points, cnn)}


def test_aggregate_pools_rounds() -> None:
    floor = Column("floor-asgi", "f", "floor-asgi", "wrk", Request("/", b"", {}))
    point = aggregate(floor, 32, [_round(1000.0, 0.1, 0.3), _round(2000.0, 0.3, 0.9)])
    assert point["rps"] == 1500.0  # mean of the rounds
    assert point["p50"] == pytest.approx(0.2) and point["p99"] == pytest.approx(0.6)  # medians
    assert point["server_cpu_us"] == pytest.approx(1e6 * 1.0 / 6000)  # CPU pooled over all requests
    assert point["client_cpu_share"] == pytest.approx(0.5)
    assert "batch" not in point


def test_report_writes_markdown_json_and_targets(tmp_path: Path) -> None:
    result = canned()
    written = report.write(result, tmp_path, png=False)
    assert [p.name for p in written] == ["serve.md", "serve.json"]
    text = (tmp_path / "serve.md").read_text()
    assert "| 32 | capsa V2 JSON | 0.55x | 19,200 |" in text  # ratio first, then req/s
    assert "| 0.30 | 4.00 | 0.20 (0.10) | 6.0 |" in text  # p50, p99, in server 12 ms / 60, compute 1 ms / 10
    assert "| 1 | bare ASGI floor | 1.00x |" in text
    assert "ray-serve: unavailable (pip install failed: x)" in text
    assert "FAIL: binary at c=32 is 0.83x JSON's req/s (>= 1)" in text
    assert "PASS: V2 JSON at c=32 0.55x the bare floor" in text
    assert "| 0.90x | 0.95x | 900 | 1,000 | 48.0 | 1 |" in text
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["points"][2]["batch"] == 6.0 and data["meta"]["command"] == "python -m bench serve --quick"


def test_report_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = report.plot(canned(), tmp_path / "serve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrk_latency_units() -> None:
    assert [harness._ms(t) for t in ("250.00us", "1.50ms", "2.00s")] == [0.25, 1.5, 2000.0]
    with pytest.raises(ValueError, match="unparsable"):
        harness._ms("fast")


def test_wrk_script_sends_binary_body(tmp_path: Path) -> None:
    body = b'{"a":1}\x00\xff'
    script = harness.wrk_script(Request("/x", body, {"Inference-Header-Content-Length": "7"}), tmp_path)
    text = script.read_text()
    assert 'wrk.method = "POST"' in text and 'wrk.headers["Inference-Header-Content-Length"] = "7"' in text
    body_file = text.split('io.open("', 1)[1].split('"', 1)[0]
    assert Path(body_file).read_bytes() == body


def _post(app: object, path: str, body: bytes) -> httpx.Response:
    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://floor") as client:
            return await client.post(path, content=body, headers={"Content-Type": "application/json"}, timeout=10)

    return asyncio.run(post())


def test_bare_floor_answers_fixed_document() -> None:
    answer = _post(bare_app, "/anything", b'{"inputs": []}')
    assert answer.status_code == 200 and answer.content == ANSWER
    assert json.loads(answer.content)["outputs"][0]["name"] == "prediction"


def test_fastapi_floor_echoes_the_body() -> None:
    answer = _post(fastapi_app(), "/echo", b'{"inputs": [1]}')  # 422 when FastAPI misreads the route's signature
    assert (answer.status_code, answer.content) == (200, b'{"inputs": [1]}')


def test_overhead_dispatches_to_capsa_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["overhead", "--help"])  # capsa_overhead.py parses its own options
    assert exc.value.code == 0
    assert "capsa_overhead.py" in capsys.readouterr().out


def test_peer_names_agree() -> None:
    from bench import peers, serve

    assert tuple(peers.PACKAGES) == serve.PEER_SERVERS == tuple(peers.DISTRIBUTIONS)


def test_wake_cost_runs_every_case() -> None:
    """The wake-cost script runs (tiny n) and reports a positive p50 for each of its five gaps, leaving torch's
    thread count as it found it (it measures on one thread; a leaked setting changed later tests' results)."""
    import torch

    from bench import wake_cost

    threads = torch.get_num_threads()
    cases = wake_cost._cases(20)
    assert torch.get_num_threads() == threads
    assert [label for label, _ in cases] == ["back to back", "0.5 ms spinning", "0.5 ms asleep", "2 ms spinning",
                                            "2 ms asleep"]
    assert all(p50 > 0 for _, p50 in cases)
