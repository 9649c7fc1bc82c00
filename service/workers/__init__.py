"""Worker processes: each loads one model version with ``capsa.load_bundle`` on one device and runs batches.

The HTTP process never runs model code. It talks to each worker over a socket pair, one typed message per batch
each way (:mod:`.messages`), framed without pickle (:mod:`.codec`: a JSON header plus the arrays' raw bytes, so
nothing is copied per sample). :mod:`.child` is the worker's side (blocking I/O), :mod:`.handle` the parent's side
(an ``asyncio`` protocol on the server's event loop: no thread hop, no partial writes, nothing blocking).
"""

from service.workers.codec import FrameReader, ProtocolError, encode
from service.workers.handle import WorkerGone, WorkerProcess
from service.workers.messages import Failed, Outcome, Outputs, Split, WorkerSpec

__all__ = ["Failed", "FrameReader", "Outcome", "Outputs", "ProtocolError", "Split", "WorkerGone", "WorkerProcess",
           "WorkerSpec", "encode"]
