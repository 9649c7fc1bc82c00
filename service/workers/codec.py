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

from service.workers.messages import MESSAGE_TYPES, Message

MAGIC = b"CW1\0"
_PREFIX = struct.Struct("<4sI")
_MAX_HEADER = 16 * 1024 * 1024  # a header this large is corruption: headers hold shapes, not data
_SMALL = 64 * 1024  # frames smaller than this go out as one joined buffer (one write)
_DIRECT = 64 * 1024  # reads of at least this many bytes go straight into their array's buffer
_SCRATCH = 256 * 1024


class ProtocolError(ValueError):
    """The byte stream is not a valid sequence of frames (corruption, desynchronisation, unknown message)."""


# ------------------------------------------------------------------------------------------------ encoding


def _to_json(value: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        arrays.append(np.ascontiguousarray(value))
        return {"#": len(arrays) - 1}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if MESSAGE_TYPES.get(name) is not type(value):
            raise TypeError(f"cannot encode {type(value).__qualname__}: not a worker message type")
        out = {"$": name}
        for f in dataclasses.fields(value):
            out[f.name] = _to_json(getattr(value, f.name), arrays)
        return out
    if isinstance(value, (tuple, list)):
        return [_to_json(item, arrays) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot encode a {type(value).__qualname__} in a worker message")


def encode(message: Message) -> list[bytes | memoryview]:
    """The frame of ``message`` as buffers to write in order (large arrays are views of their own memory)."""
    arrays: list[np.ndarray] = []
    body = _to_json(message, arrays)
    views = [a.reshape(-1).view(np.uint8).data for a in arrays]
    header = orjson.dumps({"m": body, "a": [[a.dtype.str, list(a.shape), v.nbytes] for a, v in zip(
        arrays, views, strict=True)]})
    head = _PREFIX.pack(MAGIC, len(header)) + header
    if sum(v.nbytes for v in views) < _SMALL:
        return [b"".join([head, *views])]
    return [head, *views]


# ------------------------------------------------------------------------------------------------ decoding


def _from_json(value: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(item, arrays) for item in value)
    if isinstance(value, dict):
        if "#" in value:
            index = value["#"]
            if not isinstance(index, int) or not 0 <= index < len(arrays):
                raise ProtocolError(f"array reference {index!r} is out of range ({len(arrays)} arrays)")
            return arrays[index]
        cls = MESSAGE_TYPES.get(value.get("$"))  # type: ignore[arg-type]
        if cls is None:
            raise ProtocolError(f"unknown message type {value.get('$')!r}")
        fields = {k: _from_json(v, arrays) for k, v in value.items() if k != "$"}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ProtocolError(f"malformed {cls.__name__}: {exc}") from None
    return value


def _array_spec(spec: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        dtype_str, shape, nbytes = spec
        dtype = np.dtype(dtype_str)
        shape = tuple(int(d) for d in shape)
        nbytes = int(nbytes)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed array spec {spec!r}: {exc}") from None
    if dtype.hasobject or any(d < 0 for d in shape) or nbytes != math.prod(shape) * dtype.itemsize:
        raise ProtocolError(f"inconsistent array spec {spec!r}")
    return dtype, shape, nbytes


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
                try:
                    header = orjson.loads(self._target)
                    self._body, specs = header["m"], header["a"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ProtocolError(f"malformed frame header: {exc}") from None
                self._specs = [_array_spec(spec) for spec in specs]
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
