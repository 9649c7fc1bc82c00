"""KServe V2 (Open Inference Protocol) tensor codec: JSON ``data`` and the binary tensor data extension.

Requests are decoded straight from the raw body with orjson and numpy (no pydantic, no per-element Python loops),
so the inference hot path stays cheap. Binary data follows Triton's extension: the ``Inference-Header-Content-Length``
header gives the JSON header's length, raw little-endian tensor bytes follow it in input order, each input naming
its byte count in ``parameters.binary_data_size``. Outputs go out in binary when the request asks for it per output
(``parameters.binary_data``) or for all (``parameters.binary_data_output``), as ``tritonclient.http`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from capsa.manifest import V2_DATATYPES

#: V2 datatype name -> little-endian numpy dtype, from `capsa.manifest.V2_DATATYPES` (BYTES and BF16 have none:
#: capsa-serve does not serve them).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(dt.numpy) for name, dt in V2_DATATYPES.items() if dt.numpy is not None
}
_NAMES_BY_KIND: dict[tuple[str, int], str] = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}

HEADER_LENGTH = "inference-header-content-length"


class ProtocolError(ValueError):
    """A malformed or invalid request; answered with HTTP 400 and this message."""


def datatype_of(dtype: np.dtype) -> str:
    """The V2 datatype name of a numpy dtype."""
    try:
        return _NAMES_BY_KIND[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no V2 datatype") from None


#: Longest accepted request id (V2 ``id`` or ``X-Request-ID``): longer ones are refused, never echoed or logged.
MAX_ID_LENGTH = 128

#: numpy kinds that JSON ``data`` may hold, per kind of the target dtype: numbers only, booleans only for BOOL.
_JSON_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}
_KIND_WORDS = {"f": "numbers", "i": "integers", "u": "integers", "b": "booleans"}
_FOUND = {"U": "strings", "S": "strings", "b": "booleans", "f": "non-integer numbers", "O": "null, nested or "
          "out-of-range values", "i": "integers", "u": "integers"}


@dataclass(slots=True)
class RequestedOutput:
    """One entry of the request's ``outputs`` list."""

    name: str
    binary: bool


@dataclass(slots=True)
class InputTensor:
    """One input of a request, checked for form but not yet decoded: ``data`` (JSON) or ``raw`` (binary bytes).

    Decoding is left to :meth:`decode`, so that the name, datatype and shape can be checked against the model
    (cheap) before any work proportional to the data is done.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None
    raw: memoryview | None = None
    maybe_bools: bool = True  # False when the JSON text has no true/false at all (skips the exact check)

    def decode(self) -> np.ndarray:
        """The input as an array of its declared shape and datatype (ProtocolError if it is not that)."""
        return decode_tensor(self.name, self.datatype, self.shape, data=self.data, raw=self.raw,
                             maybe_bools=self.maybe_bools)


@dataclass(slots=True)
class InferRequest:
    """A parsed V2 inference request: its id, its inputs (not yet decoded) and what it wants back."""

    id: str | None
    inputs: dict[str, InputTensor]
    outputs: list[RequestedOutput] | None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise ProtocolError(f"input '{name}': shape must be a list of non-negative integers")
    return tuple(value)


def json_array(name: str, data: Any, datatype: str, *, maybe_bools: bool = True) -> np.ndarray:
    """Convert JSON ``data`` (nested lists) to an array of ``datatype``, strictly.

    Only numbers are accepted for numeric datatypes (no strings, booleans or nulls: numpy would quietly convert
    ``"1.5"`` and ``true``), integers only for integer datatypes and within their range, booleans only for BOOL.
    ``maybe_bools=False`` says the JSON text holds no ``true``/``false`` (booleans hidden among numbers, which numpy
    turns into 1 and 0, are then impossible and the exact per-element check is skipped).
    """
    dtype = DATATYPES[datatype]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"input '{name}': data is not a regular array of {datatype}: {exc}") from None
    kind = array.dtype.kind
    allowed = _JSON_KINDS[dtype.kind]
    if kind not in allowed or (kind != "b" and maybe_bools and array.size
                               and any(type(v) is bool for v in np.asarray(data, dtype=object).flat)):
        found = _FOUND.get(kind, array.dtype.name) if kind not in allowed else "booleans"
        raise ProtocolError(f"input '{name}': data must be {_KIND_WORDS[dtype.kind]} for {datatype}, "
                            f"found {found}")
    if array.dtype == dtype:
        return array
    if dtype.kind == "f":  # overflow gives inf, which the finiteness check then names (capsa-serve sets
        return array.astype(dtype)  # numpy's over="ignore": no RuntimeWarning)
    converted = array.astype(dtype)
    if kind != "b" and not np.array_equal(converted, array):
        raise ProtocolError(f"input '{name}': data is out of range for {datatype}")
    return converted


def decode_tensor(name: str, datatype: str, shape: tuple[int, ...], data: Any = None,
                  raw: memoryview | bytes | None = None, *, maybe_bools: bool = True) -> np.ndarray:
    """Decode one tensor from JSON ``data`` (flat or nested, row-major) or from raw little-endian bytes.

    The declared shape bounds the work: JSON data with more entries than the shape needs is refused by count
    before it is converted.
    """
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise ProtocolError(f"input '{name}': datatype {datatype!r} is not supported")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ProtocolError(
                f"input '{name}': binary data has {len(raw)} bytes, shape {list(shape)} of {datatype} "
                f"needs {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype)
        if dtype == DATATYPES["BOOL"] and array.size and np.any(array.view(np.uint8) > 1):
            raise ProtocolError(f"input '{name}': BOOL bytes must be 0 or 1")
        return array.reshape(shape)
    if not isinstance(data, list):
        raise ProtocolError(f"input '{name}': 'data' must be a list")
    if len(data) != count and (len(shape) < 2 or len(data) != shape[0]):
        raise ProtocolError(f"input '{name}': data has {len(data)} elements, shape {list(shape)} needs {count}"
                            + (f" (or {shape[0]} rows)" if len(shape) > 1 else ""))
    array = json_array(name, data, datatype, maybe_bools=maybe_bools)
    if array.size != count:
        raise ProtocolError(
            f"input '{name}': data has {array.size} elements, shape {list(shape)} needs {count}"
        )
    return array.reshape(shape)


def _outputs(raw_outputs: Any, binary_output: bool) -> list[RequestedOutput] | None:
    if raw_outputs is None:
        return None
    if not isinstance(raw_outputs, list):
        raise ProtocolError("'outputs' must be a list")
    outputs = []
    seen = set()
    for item in raw_outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("each requested output must be an object with a string 'name'")
        name = item["name"]
        if name in seen:
            raise ProtocolError(f"output '{name}' appears twice")
        seen.add(name)
        oparams = item.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise ProtocolError(f"output '{name}': 'parameters' must be an object")
        flag = oparams.get("binary_data", binary_output)
        if not isinstance(flag, bool):
            raise ProtocolError(f"output '{name}': parameters.binary_data must be a boolean")
        outputs.append(RequestedOutput(name, flag))
    return outputs


def request_id_problem(request_id: str, what: str = "'id'") -> str | None:
    """Why a request id cannot be used (it is echoed in the X-Request-ID header and logged), else None: more than
    MAX_ID_LENGTH characters, or characters other than printable ASCII."""
    if len(request_id) > MAX_ID_LENGTH:
        return f"{what} is longer than {MAX_ID_LENGTH} characters"
    if not (request_id.isascii() and request_id.isprintable()):
        return f"{what} must be printable ASCII (it is echoed in the X-Request-ID header)"
    return None


def check_request_id(request_id: Any, what: str = "'id'") -> None:
    """Refuse a request id that is not a string :func:`request_id_problem` accepts."""
    if not isinstance(request_id, str):
        raise ProtocolError(f"{what} must be a string")
    problem = request_id_problem(request_id, what)
    if problem is not None:
        raise ProtocolError(problem)


def parse_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse a V2 infer request body; ``header_length`` is the Inference-Header-Content-Length, if any.

    Everything but the tensor data is checked here (structure, ids, parameters, requested outputs, binary sizes);
    each input's data is decoded later by :meth:`InputTensor.decode`.
    """
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {header_length} is outside the body ({len(body)} bytes)"
            )
        # The JSON header as bytes (a small copy): ``b"true" in`` a memoryview compares single bytes, never finds it
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, None
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request body must be a JSON object")
    request_id = request.get("id")
    if request_id is not None:
        check_request_id(request_id)
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("parameters.binary_data_output must be a boolean")
    outputs = _outputs(request.get("outputs"), binary_output)
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    maybe_bools = b"true" in head or b"false" in head
    inputs: dict[str, InputTensor] = {}
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("each input must be an object with a string 'name'")
        name = item["name"]
        if name in inputs:
            raise ProtocolError(f"input '{name}' appears twice")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"input '{name}': 'datatype' must be a string")
        if datatype not in DATATYPES:
            raise ProtocolError(f"input '{name}': datatype {datatype!r} is not supported")
        shape = _shape(name, item.get("shape"))
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"input '{name}': 'parameters' must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if binary is None:
                raise ProtocolError(
                    f"input '{name}': binary_data_size given without an Inference-Header-Content-Length header"
                )
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise ProtocolError(f"input '{name}': binary_data_size {size!r} is outside the binary data")
            inputs[name] = InputTensor(name, datatype, shape, raw=binary[offset : offset + size])
            offset += size
        else:
            if "data" not in item:
                raise ProtocolError(f"input '{name}': needs 'data' or parameters.binary_data_size")
            inputs[name] = InputTensor(name, datatype, shape, data=item["data"], maybe_bools=maybe_bools)
    if binary is not None and offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    return InferRequest(request_id, inputs, outputs, parameters, binary_output)


def check_signature(name: str, datatype: str, shape: tuple[int, ...], expected_datatype: str,
                    expected_shape: list[int], *, max_batch_size: int) -> None:
    """Check an input's declared datatype and shape against the model's (``-1`` = any size) and its batch size
    against ``max_batch_size``; raise ProtocolError naming it. Cheap: run it before decoding the data."""
    if datatype != expected_datatype:
        raise ProtocolError(f"input '{name}': datatype {datatype} does not match the model's {expected_datatype}")
    if len(shape) != len(expected_shape) or any(e != -1 and e != s for s, e in zip(shape, expected_shape, strict=True)):
        raise ProtocolError(f"input '{name}': shape {list(shape)} does not match the model's {expected_shape}")
    if shape[0] < 1:
        raise ProtocolError(f"input '{name}': the batch dimension must be at least 1")
    if shape[0] > max_batch_size:
        raise ProtocolError(
            f"input '{name}': batch size {shape[0]} exceeds the model's max_batch_size {max_batch_size}"
        )


def check_finite(name: str, array: np.ndarray) -> None:
    """Refuse NaN or infinite values in a floating-point input."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError(f"input '{name}': contains non-finite values (NaN or infinity)")


def check_input(name: str, datatype: str, array: np.ndarray, expected_datatype: str,
                expected_shape: list[int], *, max_batch_size: int, allow_non_finite: bool) -> None:
    """:func:`check_signature` on a decoded array, then :func:`check_finite` unless the model allows NaN/inf."""
    check_signature(name, datatype, array.shape, expected_datatype, expected_shape, max_batch_size=max_batch_size)
    if not allow_non_finite:
        check_finite(name, array)


def _le(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a V2 response from ``(name, array, binary)`` outputs.

    Returns the body and, when any output went out in binary, the JSON header's length (for the
    ``Inference-Header-Content-Length`` response header), else ``None``.
    """
    entries = []
    blobs: list[bytes] = []
    for name, array, binary in outputs:
        array = _le(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = entries
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def decode_infer_response(body: bytes, header_length: int | None = None) -> dict[str, np.ndarray]:
    """Decode a V2 response into ``{name: array}`` (the client side; used by tests and the benchmark)."""
    head = body if header_length is None else body[:header_length]
    response = orjson.loads(head)
    offset = header_length or 0
    result = {}
    for out in response["outputs"]:
        shape = tuple(out["shape"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            result[out["name"]] = decode_tensor(out["name"], out["datatype"], shape,
                                                raw=body[offset : offset + size])
            offset += size
        else:
            result[out["name"]] = decode_tensor(out["name"], out["datatype"], shape, data=out["data"])
    return result
