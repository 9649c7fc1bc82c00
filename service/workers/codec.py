"""Framing of the worker messages on a stream socket: no pickle, no size limit, arrays never copied per sample.

A frame is ``b"CW1\\0"``, the JSON header's length (uint32 LE), the JSON header, then the raw bytes of each numpy
array in order. The header holds the message (dataclasses as ``{"$": type name, field: value}``, arrays as
``{"#": index}``, sequences as lists that decode to tuples) and the arrays' ``[dtype, shape, nbytes]``.

:func:`encode` returns the frame as a list of buffers (the arrays' own memory, not copies) for one gathered write.
:class:`FrameReader` parses a byte stream incrementally, whatever the sizes of the reads, and hands out buffers to
receive into (``recv_into`` in the worker, ``asyncio.BufferedProtocol`` in the parent): a large array is received
straight into its own buffer; small pieces go through a scratch buffer. Anything malformed raises
:class:`ProtocolError`: the stream cannot be trusted after it.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import numpy as np
import orjson

from service.workers.messages import MESSAGE_TYPES, Message, Outputs, Result, RunBatch

MAGIC = b"CW1\0"
_PREFIX = struct.Struct("<4sI")
_MAX_HEADER = 16 * 1024 * 1024  # a header this large is corruption: headers hold shapes, not data
_SMALL = 64 * 1024  # frames smaller than this go out as one joined buffer (one write)
_DIRECT = 64 * 1024  # reads of at least this many bytes go straight into their array's buffer
_SCRATCH = 256 * 1024


class ProtocolError(ValueError):
    """The byte stream is not a valid sequence of frames (corruption, desynchronisation, unknown message)."""


# ------------------------------------------------------------------------------------------------ encoding


#: Field names of each message type, in order (looked up per value: much cheaper than ``dataclasses.fields``).
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in MESSAGE_TYPES.values()
}


_SCALARS = frozenset({int, float, str, bool, type(None)})


def _to_json(value: Any, arrays: list[np.ndarray]) -> Any:
    # Ordered by frequency (this runs for every field of every frame: scalars first, then arrays and messages).
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is np.ndarray:
        arrays.append(np.ascontiguousarray(value))
        return {"#": len(arrays) - 1}
    names = _FIELDS.get(kind)
    if names is not None:
        out = {"$": kind.__name__}
        for name in names:
            out[name] = _to_json(getattr(value, name), arrays)
        return out
    if kind is tuple or kind is list:
        return [_to_json(item, arrays) for item in value]
    if isinstance(value, np.ndarray):  # a subclass
        arrays.append(np.ascontiguousarray(value))
        return {"#": len(arrays) - 1}
    if dataclasses.is_dataclass(value):
        raise TypeError(f"cannot encode {type(value).__qualname__}: not a worker message type")
    if isinstance(value, (tuple, list)):
        return [_to_json(item, arrays) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot encode a {type(value).__qualname__} in a worker message")


def _outputs_json(outputs: Outputs, arrays: list[np.ndarray]) -> dict[str, Any]:
    """``_to_json`` of an :class:`Outputs`, written out (it is in every result: the hot path of the round trip)."""
    first = len(arrays)
    arrays += (np.ascontiguousarray(outputs.prediction), np.ascontiguousarray(outputs.risk),
               np.ascontiguousarray(outputs.risk_score))
    components = []
    for name, array in outputs.components:
        components.append([_to_json(name, arrays), {"#": len(arrays)}])
        arrays.append(np.ascontiguousarray(array))
    return {"$": "Outputs", "prediction": {"#": first}, "risk": {"#": first + 1}, "risk_score": {"#": first + 2},
            "components": components}


def _message_json(message: Message, arrays: list[np.ndarray]) -> Any:
    """``_to_json(message)``: the same JSON, built directly for the messages of every batch (a batch and its
    result with outputs), generically for the rest."""
    kind = type(message)
    if kind is RunBatch:
        assert isinstance(message, RunBatch)
        arrays.append(np.ascontiguousarray(message.array))
        return {"$": "RunBatch", "batch_id": _to_json(message.batch_id, arrays), "array": {"#": len(arrays) - 1},
                "offsets": [_to_json(o, arrays) for o in message.offsets]}
    if kind is Result and type(message.outcome) is Outputs:  # type: ignore[union-attr]
        assert isinstance(message, Result) and isinstance(message.outcome, Outputs)
        return {"$": "Result", "batch_id": _to_json(message.batch_id, arrays),
                "compute_s": _to_json(message.compute_s, arrays), "outcome": _outputs_json(message.outcome, arrays)}
    return _to_json(message, arrays)


def encode(message: Message) -> list[bytes | memoryview]:
    """The frame of ``message`` as buffers to write in order (large arrays are views of their own memory)."""
    arrays: list[np.ndarray] = []
    body = _message_json(message, arrays)
    views = [a.reshape(-1).view(np.uint8).data for a in arrays]
    header = orjson.dumps({"m": body, "a": [[a.dtype.str, list(a.shape), v.nbytes] for a, v in zip(
        arrays, views, strict=True)]})
    head = _PREFIX.pack(MAGIC, len(header)) + header
    if sum(v.nbytes for v in views) < _SMALL:
        return [b"".join([head, *views])]
    return [head, *views]


# ------------------------------------------------------------------------------------------------ decoding


def _from_json(value: Any, arrays: list[np.ndarray]) -> Any:
    kind = type(value)
    if kind is list:
        return tuple([_from_json(item, arrays) for item in value])
    if kind is not dict:
        return value
    if "#" in value:
        index = value["#"]
        if type(index) is not int or not 0 <= index < len(arrays):
            raise ProtocolError(f"array reference {index!r} is out of range ({len(arrays)} arrays)")
        return arrays[index]
    cls = MESSAGE_TYPES.get(value.get("$"))
    if cls is None:
        raise ProtocolError(f"unknown message type {value.get('$')!r}")
    fields = {k: _from_json(v, arrays) for k, v in value.items() if k != "$"}
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ProtocolError(f"malformed {cls.__name__}: {exc}") from None


_DTYPES: dict[str, np.dtype] = {}  # dtype strings seen (a handful: the models' input and output dtypes)


def _array_spec(spec: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        dtype_str, shape, nbytes = spec
        dtype = _DTYPES.get(dtype_str)
        if dtype is None:
            dtype = np.dtype(dtype_str)
            if len(_DTYPES) < 64:
                _DTYPES[dtype_str] = dtype
        shape = tuple(shape)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed array spec {spec!r}: {exc}") from None
    if (dtype.hasobject or type(nbytes) is not int or not all(type(d) is int and d >= 0 for d in shape)
            or nbytes != math.prod(shape) * dtype.itemsize):
        raise ProtocolError(f"inconsistent array spec {spec!r}")
    return dtype, shape, nbytes


def _parse_header(raw: memoryview) -> tuple[Any, list[tuple[np.dtype, tuple[int, ...], int]]]:
    try:
        header = orjson.loads(raw)
        body, specs = header["m"], header["a"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed frame header: {exc}") from None
    if not isinstance(specs, list):
        raise ProtocolError(f"malformed frame header: array specs {specs!r}")
    return body, [_array_spec(spec) for spec in specs]


class FrameReader:
    """Incremental frame parser: call :meth:`get_buffer`, receive into it, then :meth:`feed` the byte count."""

    def __init__(self) -> None:
        self._scratch = memoryview(bytearray(_SCRATCH))
        self._direct = False
        self._start_frame()

    def _start_frame(self) -> None:
        self._stage = "prefix"
        self._target = memoryview(bytearray(_PREFIX.size))
        self._filled = 0
        self._body: Any = None
        self._specs: list[tuple[np.dtype, tuple[int, ...], int]] = []
        self._buffers: list[bytearray] = []
        self.pending_bytes = 0  # bytes of the current frame received so far

    @property
    def at_boundary(self) -> bool:
        """True between frames (so an end of stream here loses nothing)."""
        return self.pending_bytes == 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes should be received."""
        need = len(self._target) - self._filled
        self._direct = need >= _DIRECT
        return self._target[self._filled:] if self._direct else self._scratch

    def feed(self, nbytes: int) -> list[Message]:
        """``nbytes`` were received into the last :meth:`get_buffer`; returns the messages completed by them."""
        messages: list[Message] = []
        self.pending_bytes += nbytes
        if self._direct:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._advance(messages)
            return messages
        data, pos = self._scratch, 0
        while pos < nbytes:
            if self._stage == "prefix" and self._filled == 0:  # at a frame boundary: the whole frame may be here
                end = self._whole_frame(data, pos, nbytes, messages)
                if end is not None:
                    pos = end
                    self.pending_bytes = nbytes - pos
                    continue
            take = min(len(self._target) - self._filled, nbytes - pos)
            self._target[self._filled:self._filled + take] = data[pos:pos + take]
            self._filled += take
            pos += take
            if self._filled == len(self._target):
                done = len(messages)
                self._advance(messages)
                if len(messages) > done:  # a frame ended inside this read: what follows belongs to the next
                    self.pending_bytes = nbytes - pos
        return messages

    def _whole_frame(self, data: memoryview, pos: int, end: int, messages: list[Message]) -> int | None:
        """Decode the frame at ``data[pos:end]`` in place if it is complete (the common case for small frames)."""
        if end - pos < _PREFIX.size:
            return None
        magic, length = _PREFIX.unpack_from(data, pos)
        head = pos + _PREFIX.size
        if magic != MAGIC or not 0 < length <= _MAX_HEADER or head + length > end:
            return None  # incomplete (or invalid: the general path says why)
        body, specs = _parse_header(data[head:head + length])
        offset: int = head + length
        if offset + sum(nbytes for _, _, nbytes in specs) > end:
            return None
        arrays = []
        for dtype, shape, nbytes in specs:
            arrays.append(np.frombuffer(bytearray(data[offset:offset + nbytes]), dtype=dtype).reshape(shape))
            offset += nbytes
        messages.append(_from_json(body, arrays))
        return offset

    def _advance(self, messages: list[Message]) -> None:
        """The current target is full: move to the next part of the frame (skipping empty arrays)."""
        while self._filled == len(self._target):
            if self._stage == "prefix":
                magic, length = _PREFIX.unpack(self._target)
                if magic != MAGIC:
                    raise ProtocolError(f"bad frame start {bytes(self._target)!r}: the stream is out of sync")
                if not 0 < length <= _MAX_HEADER:
                    raise ProtocolError(f"frame header of {length} bytes")
                self._stage, self._target, self._filled = "header", memoryview(bytearray(length)), 0
            elif self._stage == "header":
                self._body, self._specs = _parse_header(self._target)
                self._stage = "arrays"
                self._next_array()
            else:  # an array is complete
                self._next_array()
            if self._stage == "done":
                arrays = [np.frombuffer(buf, dtype=dtype).reshape(shape)
                          for buf, (dtype, shape, _) in zip(self._buffers, self._specs, strict=True)]
                messages.append(_from_json(self._body, arrays))
                self._start_frame()
                return

    def _next_array(self) -> None:
        if len(self._buffers) == len(self._specs):
            self._stage = "done"
            self._target, self._filled = memoryview(b""), 0
            return
        buffer = bytearray(self._specs[len(self._buffers)][2])
        self._buffers.append(buffer)
        self._target, self._filled = memoryview(buffer), 0


def register(*types: type) -> None:
    """Let frames carry more message types (frozen dataclasses of the kinds above), e.g. the HTTP front ends'
    forwarding messages (:mod:`service.frontends.messages`); a peer can still build nothing unregistered."""
    for cls in types:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        MESSAGE_TYPES[cls.__name__] = cls
        _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
