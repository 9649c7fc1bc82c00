"""Several HTTP front-end processes on one port (``CAPSA_HTTP_PROCESSES`` > 1), sharing the model workers.

The primary process (:mod:`.primary`) is the whole server as with one process: manager, batchers, workers,
gRPC, repository API and metrics, and it serves HTTP too. Each secondary (:mod:`.secondary`) binds the same port
with ``SO_REUSEPORT`` and does the per-request HTTP work itself (parsing, limits, decoding, validation, encoding,
access log), forwarding only the checked input tensor to the primary's batcher over a Unix socket
(:mod:`.messages`, framed by :mod:`service.workers.codec`), so requests from every front end batch together.
With ``CAPSA_HTTP_MAIN_SERVES=false`` the primary holds the port without listening and all N HTTP processes are
secondaries: its per-request work is then only the forwarding and the batching.
"""
