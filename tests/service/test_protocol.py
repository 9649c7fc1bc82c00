"""Unit tests of the KServe V2 tensor codec (JSON and binary tensor data), no server."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest

from service.protocol import (
    InferRequest,
    ProtocolError,
    check_input,
    decode_infer_response,
    encode_infer_response,
    parse_infer_request,
)


def decode_infer_request(raw: bytes, header_length: int | None = None) -> InferRequest:
    """Parse, then decode every input (what the server does, one step at a time)."""
    req = parse_infer_request(raw, header_length)
    for tensor in req.inputs.values():
        tensor.decode()
    return req


def body(inputs: list, **extra: object) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


def test_flat_and_nested_json_data_decode_row_major() -> None:
    flat = decode_infer_request(body([{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]))
    nested = decode_infer_request(
        body([{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}], id="a")
    )
    for req in (flat, nested):
        datatype, array = req.inputs["x"].datatype, req.inputs["x"].decode()
        assert datatype == "FP32" and array.dtype == np.float32 and array.shape == (2, 3)
        np.testing.assert_array_equal(array, [[1, 2, 3], [4, 5, 6]])
    assert nested.id == "a" and flat.id is None and flat.outputs is None


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"])
def test_binary_round_trip_every_datatype(datatype: str) -> None:
    from service.protocol import DATATYPES

    dtype = DATATYPES[datatype]
    values = (np.arange(6) % 2).astype(dtype) if datatype == "BOOL" else np.arange(6).astype(dtype)
    values = values.reshape(2, 3)
    raw = values.tobytes()
    head = body([{"name": "x", "datatype": datatype, "shape": [2, 3], "parameters": {"binary_data_size": len(raw)}}])
    req = decode_infer_request(head + raw, len(head))
    np.testing.assert_array_equal(req.inputs["x"].decode(), values)
    content, length = encode_infer_response("m", "1", "id-1", [("y", values, True), ("z", values, False)])
    assert length is not None
    decoded = decode_infer_response(content, length)
    np.testing.assert_array_equal(decoded["y"], values)
    np.testing.assert_array_equal(decoded["z"], values)
    assert decoded["y"].dtype == dtype and decoded["z"].dtype == dtype


def test_two_binary_inputs_are_read_in_order() -> None:
    a = np.arange(4, dtype=np.float32)
    b = np.arange(3, dtype=np.int64)
    head = body([
        {"name": "a", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}},
        {"name": "b", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": 24}},
    ])
    req = decode_infer_request(head + a.tobytes() + b.tobytes(), len(head))
    np.testing.assert_array_equal(req.inputs["a"].decode(), a)
    np.testing.assert_array_equal(req.inputs["b"].decode(), b)


def test_output_selection_and_binary_flags() -> None:
    x = [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]
    req = decode_infer_request(body(x, outputs=[{"name": "risk", "parameters": {"binary_data": True}},
                                                {"name": "prediction"}]))
    assert [(o.name, o.binary) for o in req.outputs] == [("risk", True), ("prediction", False)]
    outs = [{"name": "risk"}, {"name": "flagged", "parameters": {"binary_data": False}}]
    req = decode_infer_request(body(x, parameters={"binary_data_output": True, "risk_threshold": 0.5}, outputs=outs))
    assert [(o.name, o.binary) for o in req.outputs] == [("risk", True), ("flagged", False)]
    assert req.parameters["risk_threshold"] == 0.5 and req.binary_output is True


def test_json_response_is_plain_json() -> None:
    content, length = encode_infer_response("m", "2", None, [("p", np.array([[0.5], [1.5]], np.float32), False),
                                                             ("f", np.array([True, False]), False)])
    assert length is None
    doc = orjson.loads(content)
    assert doc["model_name"] == "m" and doc["model_version"] == "2" and "id" not in doc
    assert doc["outputs"][0] == {"name": "p", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 1.5]}
    assert doc["outputs"][1] == {"name": "f", "datatype": "BOOL", "shape": [2], "data": [True, False]}


@pytest.mark.parametrize(
    ("raw", "header_length", "message"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[]", None, "must be a JSON object"),
        (b'{"inputs": []}', None, "'inputs' must be a non-empty list"),
        (b'{"inputs": [{"datatype": "FP32"}]}', None, "string 'name'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}', None,
         "input 'x': data has 1 elements, shape [2] needs 2"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}]}', None,
         "input 'x': data is not a regular array"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}', None,
         "input 'x': data must be numbers for FP32, found strings"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}', None,
         "input 'x': datatype 'BYTES' is not supported"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None,
         "input 'x': shape must be a list of non-negative integers"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', None, "input 'x': needs 'data'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]}',
         None, "without an Inference-Header-Content-Length"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]}'
         b"\0\0\0\0", -4, "input 'x': binary data has 4 bytes, shape [2] of FP32 needs 8"),
        (b"{}", 50, "outside the body"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}XXXX', -4,
         "4 bytes of binary data are not claimed"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},'
         b' {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', None, "input 'x' appears twice"),
        (b'{"id": 5, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', None,
         "'id' must be a string"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]}', None,
         "input 'x': data is out of range for UINT8"),
        (b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2.5]}]}', None,
         "input 'x': data must be integers for INT32, found non-integer numbers"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, true]}]}', None,
         "input 'x': data must be numbers for FP32, found booleans"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, null]}]}', None,
         "input 'x': data must be numbers for FP32, found null"),
        (b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [2], "data": [1, 0]}]}', None,
         "input 'x': data must be booleans for BOOL, found integers"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2, 3]}]}', None,
         "input 'x': data has 3 elements, shape [1, 2] needs 2 (or 1 rows)"),
        (b'{"id": "' + b"i" * 129 + b'", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
         None, "'id' is longer than 128 characters"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],'
         b' "outputs": [{"name": "risk"}, {"name": "risk"}]}', None, "output 'risk' appears twice"),
    ],
)
def test_malformed_requests_name_the_problem(raw: bytes, header_length: int | None, message: str) -> None:
    if header_length is not None and header_length < 0:  # counted from the end: the binary part
        header_length += len(raw)
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode_infer_request(raw, header_length)


def test_check_input_against_the_signature() -> None:
    x = np.zeros((3, 4), np.float32)
    check_input("x", "FP32", x, "FP32", [-1, 4], max_batch_size=8, allow_non_finite=False)
    with pytest.raises(ProtocolError, match="input 'x': datatype FP64 does not match the model's FP32"):
        check_input("x", "FP64", x.astype(np.float64), "FP32", [-1, 4], max_batch_size=8, allow_non_finite=False)
    with pytest.raises(ProtocolError, match=r"input 'x': shape \[3, 4\] does not match the model's \[-1, 5\]"):
        check_input("x", "FP32", x, "FP32", [-1, 5], max_batch_size=8, allow_non_finite=False)
    with pytest.raises(ProtocolError, match="input 'x': shape"):
        check_input("x", "FP32", x.reshape(12), "FP32", [-1, 4], max_batch_size=8, allow_non_finite=False)
    with pytest.raises(ProtocolError, match="batch size 3 exceeds the model's max_batch_size 2"):
        check_input("x", "FP32", x, "FP32", [-1, 4], max_batch_size=2, allow_non_finite=False)
    with pytest.raises(ProtocolError, match="batch dimension must be at least 1"):
        check_input("x", "FP32", x[:0], "FP32", [-1, 4], max_batch_size=8, allow_non_finite=False)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ProtocolError, match="input 'x': contains non-finite values"):
        check_input("x", "FP32", bad, "FP32", [-1, 4], max_batch_size=8, allow_non_finite=False)
    bad[1, 2] = np.inf
    with pytest.raises(ProtocolError, match="non-finite"):
        check_input("x", "FP32", bad, "FP32", [-1, 4], max_batch_size=8, allow_non_finite=False)
    check_input("x", "FP32", bad, "FP32", [-1, 4], max_batch_size=8, allow_non_finite=True)


def test_the_signature_is_checked_before_the_data_is_decoded() -> None:
    """parse_infer_request leaves the data alone: a bad shape is found without converting a single value."""
    from service.protocol import check_signature

    req = parse_infer_request(body([{"name": "x", "datatype": "FP32", "shape": [9, 4], "data": ["junk"] * 36}]))
    tensor = req.inputs["x"]
    assert tensor.shape == (9, 4) and tensor.data == ["junk"] * 36
    with pytest.raises(ProtocolError, match="batch size 9 exceeds the model's max_batch_size 8"):
        check_signature("x", tensor.datatype, tensor.shape, "FP32", [-1, 4], max_batch_size=8)


def test_numbers_next_to_json_booleans_elsewhere_decode() -> None:
    """A request with true/false outside the data (tritonclient's binary_data flags) still decodes its numbers."""
    req = parse_infer_request(body([{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [[1, 2.5]]}],
                                   outputs=[{"name": "risk", "parameters": {"binary_data": False}}]))
    np.testing.assert_array_equal(req.inputs["x"].decode(), np.array([[1, 2.5]], np.float32))
    big = parse_infer_request(body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e39]}]))
    with np.errstate(over="ignore"):  # as capsa-serve runs
        assert np.isinf(big.inputs["x"].decode()).all()  # overflow becomes inf, which check_input then refuses


def test_booleans_in_json_data_of_a_binary_request_are_refused() -> None:
    """Old code: with an Inference-Header-Content-Length the header was a memoryview, ``b"true" in`` it was always
    False, and ``[true, 0, 0, 0]`` in an FP32 input's JSON data became ``[1.0, 0, 0, 0]``."""
    raw = np.arange(4, dtype="<f4").tobytes()
    head = orjson.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 4], "data": [True, 0, 0, 0]},
        {"name": "b", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": len(raw)}},
    ]})
    req = parse_infer_request(head + raw, len(head))
    np.testing.assert_array_equal(req.inputs["b"].decode(), np.arange(4, dtype=np.float32).reshape(1, 4))
    with pytest.raises(ProtocolError, match="input 'a': data must be numbers for FP32, found booleans"):
        req.inputs["a"].decode()
