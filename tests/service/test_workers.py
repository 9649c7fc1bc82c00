"""The worker wire codec: typed messages with numpy arrays both ways, without pickle, at any read split."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from service.workers import FrameReader, ProtocolError, encode
from service.workers.child import send, serve
from service.workers.codec import MAGIC
from service.workers.messages import (
    Failed,
    LoadFailed,
    Message,
    Outputs,
    Ready,
    Result,
    RunBatch,
    Split,
    Stop,
)


def frame(message: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(message))


def read_all(data: bytes, chunks: list[int]) -> list[Message]:
    """Feed ``data`` to a reader in reads of the given sizes (cycled), as a socket might deliver it."""
    reader = FrameReader()
    out: list[Message] = []
    pos, i = 0, 0
    while pos < len(data):
        buffer = reader.get_buffer()
        n = min(len(buffer), chunks[i % len(chunks)], len(data) - pos)
        buffer[:n] = data[pos:pos + n]
        out += reader.feed(n)
        pos, i = pos + n, i + 1
    assert reader.at_boundary
    return out


def outputs(rows: int, seed: int = 0) -> Outputs:
    rng = np.random.default_rng(seed)
    pred = rng.random((rows, 3), dtype=np.float32)
    return Outputs(pred, pred[:, ::2], pred[:, 0].copy())  # a non-contiguous array arrives contiguous


def assert_outputs_equal(got: Outputs, want: Outputs) -> None:
    for g, w in zip((got.prediction, got.risk, got.risk_score), (want.prediction, want.risk, want.risk_score),
                    strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("rows", [0, 1, 64, 4096, 300_000])  # empty, in one joined buffer, and one per array
@pytest.mark.parametrize("chunks", [[1 << 30], [1], [7, 65536, 3], [200_000]])
def test_typed_messages_round_trip_at_any_read_split(rows: int, chunks: list[int]) -> None:
    if rows == 300_000 and chunks == [1]:
        pytest.skip("byte-by-byte over 7 MB is slow; covered by the other splits")
    messages: list[Message] = [
        Ready(7, "cpu"),
        Result(12, 0.25, outputs(rows)),
        RunBatch(3, np.arange(rows * 2, dtype=np.int64).reshape(rows, 2), (0, rows)),
        Result(13, 0.5, Split((outputs(1, 1), Failed("RuntimeError: boom")))),
        Result(14, 0.0, Failed("ValueError: no")),
        LoadFailed("BundleError: nope"),
        Stop(),
        RunBatch(4, np.array([True, False]), (0, 1, 2)),
    ]
    got = read_all(b"".join(frame(m) for m in messages), chunks)
    assert len(got) == len(messages)
    assert got[0] == Ready(7, "cpu")
    assert isinstance(got[1], Result) and (got[1].batch_id, got[1].compute_s) == (12, 0.25)
    assert_outputs_equal(got[1].outcome, messages[1].outcome)  # type: ignore[arg-type, union-attr]
    assert isinstance(got[2], RunBatch) and got[2].offsets == (0, rows)
    np.testing.assert_array_equal(got[2].array, messages[2].array)  # type: ignore[union-attr]
    assert got[2].array.flags.writeable  # each array lands in its own buffer
    split = got[3].outcome  # type: ignore[union-attr]
    assert isinstance(split, Split) and split.parts[1] == Failed("RuntimeError: boom")
    assert_outputs_equal(split.parts[0], outputs(1, 1))  # type: ignore[arg-type]
    assert got[4:7] == [Result(14, 0.0, Failed("ValueError: no")), LoadFailed("BundleError: nope"), Stop()]
    assert got[7].array.dtype == np.bool_ and got[7].array.tolist() == [True, False]  # type: ignore[union-attr]


def test_large_arrays_are_sent_as_views_not_copies() -> None:
    array = np.ones((1024, 1024), dtype=np.float32)
    buffers = encode(RunBatch(1, array, (0, 1024)))
    assert len(buffers) == 2 and isinstance(buffers[1], memoryview) and buffers[1].obj is not None
    assert np.shares_memory(np.frombuffer(buffers[1], dtype=np.float32), array)


@pytest.mark.parametrize("corrupt", [
    lambda f: b"XXXX" + f[4:],  # desynchronised stream
    lambda f: MAGIC + (0).to_bytes(4, "little") + f[8:],  # empty header
    lambda f: MAGIC + (1 << 31).to_bytes(4, "little") + f[8:],  # absurd header
    lambda f: f[:8] + b"}" + f[9:],  # not JSON
    lambda f: f.replace(b'"Ready"', b'"Popen"'),  # not a message type: nothing else is ever constructed
    lambda f: f.replace(b'"pid"', b'"pod"'),  # wrong fields
])
def test_malformed_frames_are_refused_with_a_reason(corrupt: object) -> None:
    data = corrupt(frame(Ready(7, "cpu")))  # type: ignore[operator]
    with pytest.raises(ProtocolError):
        read_all(data, [1 << 20])


def test_inconsistent_array_specs_are_refused() -> None:
    data = frame(RunBatch(1, np.zeros(4, dtype=np.float32), (0, 4)))
    with pytest.raises(ProtocolError, match="inconsistent array spec"):
        read_all(data.replace(b"[4],16", b"[5],16"), [1 << 20])
    with pytest.raises(ProtocolError, match="array spec"):
        read_all(data.replace(b'"<f4"', b'"|O8"'), [1 << 20])


def test_only_message_types_can_be_encoded() -> None:
    with pytest.raises(TypeError, match="cannot encode"):
        encode(RunBatch(1, np.zeros(1), (0, {1: 2})))  # type: ignore[arg-type]


@pytest.mark.parametrize("busy_poll_s", [0.0, 0.002])
def test_child_loop_over_a_socket_pair_with_blocking_io(busy_poll_s: float) -> None:
    """The worker side: answers batches of every size in order, stops on Stop; big frames need many reads (16 MB
    here), also when each read first polls without blocking (CAPSA_BUSY_POLL_US: partial reads mid-frame)."""
    parent, child = socket.socketpair()
    thread = threading.Thread(target=serve, args=(child, lambda m: Result(m.batch_id, 0.0, Outputs(
        m.array * 2, m.array, m.array[:, 0].copy())), busy_poll_s))
    thread.start()
    try:
        arrays = [np.full((n, 4), n, dtype=np.float32) for n in (1, 9000, 2, 1_000_000)]
        reader = FrameReader()
        for i, array in enumerate(arrays):
            sender = threading.Thread(target=send, args=(parent, RunBatch(i, array, (0, len(array)))))
            sender.start()  # the answer may be written while the request is still being read
            got: list[Message] = []
            while not got:
                received = parent.recv_into(reader.get_buffer())
                assert received > 0
                got = reader.feed(received)
            sender.join(30)
            (result,) = got
            assert isinstance(result, Result) and result.batch_id == i
            np.testing.assert_array_equal(result.outcome.prediction, array * 2)  # type: ignore[union-attr]
        send(parent, Stop())
        thread.join(30)
        assert not thread.is_alive()
    finally:
        parent.close()
        child.close()


def test_child_loop_refuses_a_truncated_frame() -> None:
    parent, child = socket.socketpair()
    parent.sendall(frame(RunBatch(1, np.zeros((100_000,), dtype=np.float32), (0, 100_000)))[:70_000])
    parent.close()
    with pytest.raises(ProtocolError, match="into a frame"):
        serve(child, lambda m: None)
    child.close()


def test_batch_messages_are_encoded_as_the_generic_encoder_does() -> None:
    """The written-out JSON of RunBatch and Result(Outputs) (the messages of every batch) is exactly the generic
    encoder's, with and without components, so the wire format and the decoder stay one."""
    from service.workers.codec import _message_json, _to_json
    from service.workers.messages import Failed, Ready, Result, RunBatch, Split

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    z = np.ones((3, 1), np.float32)
    for message in (RunBatch(1, x, (0, 1, 3)), RunBatch(np.int64(2), x[:0], ()),
                    Result(3, 0.25, Outputs(z, z, z[:, 0])),
                    Result(4, 1, Outputs(z, z * 2, z[:, 0], (("risk_aleatoric", z), ("risk_epistemic", z * 3)))),
                    Result(5, 0.1, Failed("E: x")), Result(6, 0.1, Split((Outputs(z, z, z[:, 0]), Failed("e")))),
                    Ready(7, "cpu", 2, 1)):
        generic: list[np.ndarray] = []
        fast: list[np.ndarray] = []
        assert _message_json(message, fast) == _to_json(message, generic), message
        assert [(a.dtype, a.shape, a.tobytes()) for a in fast] == [(a.dtype, a.shape, a.tobytes()) for a in generic]
        assert read_all(frame(message), [len(frame(message))])[0].__class__ is type(message)
