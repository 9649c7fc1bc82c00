"""The worker pipe's message codec: numpy arrays and plain values both ways, without pickle."""

from __future__ import annotations

from multiprocessing import Pipe

import numpy as np
import pytest

from service.workers import recv_message, send_message


@pytest.mark.parametrize("rows", [1, 64, 4096])  # in the JSON frame, and out-of-band raw frames
def test_messages_round_trip(rows: int) -> None:
    sender, receiver = Pipe()
    pred = np.random.default_rng(0).random((rows, 3), dtype=np.float32)
    message = ("result", 12, 0.25, ("ok", pred, pred[:, ::2], np.array([True, False]), np.int64(5)),
               {"pid": 7, "device": "cpu", "note": None})
    send_message(sender, message)
    kind, batch_id, seconds, payload, info = recv_message(receiver)
    assert (kind, batch_id, seconds, info) == ("result", 12, 0.25, {"pid": 7, "device": "cpu", "note": None})
    assert payload[0] == "ok" and payload[4] == 5
    np.testing.assert_array_equal(payload[1], pred)
    np.testing.assert_array_equal(payload[2], pred[:, ::2])  # non-contiguous input arrives contiguous
    assert payload[1].dtype == np.float32 and payload[3].dtype == np.bool_ and payload[3].tolist() == [True, False]
    if pred.nbytes >= 64 * 1024:
        assert payload[1].flags.writeable  # large arrays land in their own buffers, no extra copy


def test_several_messages_in_a_row_stay_apart() -> None:
    sender, receiver = Pipe()
    arrays = [np.full((n, 2), n, dtype=np.int64) for n in (1, 9000, 2)]
    for i, array in enumerate(arrays):
        send_message(sender, ("batch", i, array, [0, len(array)]))
    for i, array in enumerate(arrays):
        kind, batch_id, got, offsets = recv_message(receiver)
        assert (kind, batch_id, offsets) == ("batch", i, [0, len(array)])
        np.testing.assert_array_equal(got, array)
