"""``capsa-serve``: run the server with uvicorn (uvloop + httptools, with the connection limits of
:mod:`service.edge`), with a graceful shutdown on SIGTERM.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and lets in-flight requests finish (bounded by
``CAPSA_DRAIN_TIMEOUT_S``); the app's lifespan then stops the workers, and the process exits with status 0, which is
what container runtimes expect of a clean stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service import __version__
from service.settings import Settings

log = logging.getLogger("capsa.serve")


def settings_help() -> str:
    """Every setting as its environment variable, with its default and description (the ``--help`` epilog), so
    the settings without a command-line option (tokens, limits, timeouts, cache dir) are listed too."""
    lines = ["settings (environment variables; an option above overrides its variable):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else json.dumps(default, default=str)
        lines.append(f"  CAPSA_{name.upper()}  (default {shown})")
        lines.append(f"      {field.description}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    """Command-line options, as Settings overrides (only those given; the rest come from CAPSA_* variables)."""
    parser = argparse.ArgumentParser(
        prog="capsa-serve",
        description="Serve capsa model bundles from a registry over KServe V2 REST and gRPC, with per-sample risk. "
                    "Every option is also an environment variable CAPSA_<OPTION> (e.g. CAPSA_MODEL_REPOSITORY).",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-repository", help="registry root: a directory or an fsspec URL (s3://...)")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--grpc-port", type=int,
                        help="gRPC port (KServe V2 GRPCInferenceService; default 8001; 0: off)")
    parser.add_argument("--devices", help='"auto" (default), "cpu", or "cuda:0,cuda:1"')
    parser.add_argument("--workers-per-device", type=int, help="override every model's instances")
    parser.add_argument("--log-level", help="critical, error, warning, info (default) or debug")
    parser.add_argument("--repository-poll-s", type=float,
                        help="poll the registry every N seconds for new, changed or removed models (default 0: off)")
    parser.add_argument("--allowed-modules",
                        help="comma-separated modules or module:factory entries bundles may run "
                             "(default: the demo's factory only; 'architecture' allows bundle-local code)")
    parser.add_argument("--http-processes", type=int,
                        help="HTTP front-end processes on the port, sharing the model workers (default 1)")
    parser.add_argument("--busy-poll-us", type=int,
                        help="keep workers and the event loop polling this many microseconds after each batch: "
                             "lower latency at low load for CPU time (default 0: off)")
    parser.add_argument("--demo", action="store_true", default=None,
                        help="build a small demo model into a local registry and serve it")
    parser.add_argument("--version", action="version", version=f"capsa-serve {__version__}")
    args = parser.parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def settings_problems(exc: ValidationError | SettingsError) -> str:
    """One line per invalid setting, naming the field and what is wrong but never the value (it may be a secret,
    e.g. the S3 key in CAPSA_STORAGE_OPTIONS)."""
    if isinstance(exc, SettingsError):  # a CAPSA_* value that is not valid JSON; the message names only the field
        return f"  {exc} (not valid JSON)"
    lines = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        lines.append(f"  {field} (CAPSA_{str(error['loc'][0]).upper() if error['loc'] else ''}): {error['msg']}")
    return "\n".join(lines)


def bind_tcp(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """The listening socket; ``reuse_port``: SO_REUSEPORT, so that every HTTP front end (service.frontends) binds
    the same port and the kernel spreads connections over them; ``listen=False``: only bound (the port is held,
    connections go to the front ends)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(app: Any, settings: Settings, sockets: list[socket.socket], *,
               on_server: Callable[[Any], None] | None = None,
               on_signal: Callable[[int], None] | None = None) -> bool:
    """Serve ``app`` on ``sockets`` with uvicorn (uvloop + httptools, the edge limits of service.edge) until SIGTERM
    or SIGINT, then drain; returns whether the server started. ``on_server`` gets the server before it runs,
    ``on_signal`` each shutdown signal (the HTTP front ends pass it on)."""
    import uvicorn

    from service.edge import EdgeLimits, EdgeServer, protocol_class

    limits = EdgeLimits.from_settings(settings)
    config = uvicorn.Config(
        app, loop="uvloop", http=protocol_class(limits), lifespan="on",
        access_log=False, log_config=None, log_level=settings.log_level,
        # uvicorn annotates these int but uses them as seconds in float arithmetic: fractions work
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        server_header=False,
    )
    server = EdgeServer(config, limits, settings.shutdown_grace_s)
    if on_signal is not None:
        handle_exit = server.handle_exit

        def relay(sig: int, frame: Any) -> None:
            on_signal(sig)
            handle_exit(sig, frame)

        server.handle_exit = relay  # type: ignore[method-assign]
    if on_server is not None:
        on_server(server)
    # uvicorn handles SIGTERM/SIGINT itself (graceful drain), then restores the previous handlers and re-raises
    # the signal: with these no-op handlers in place, that re-raise does not kill us and we exit with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=sockets)
    return bool(server.started)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``capsa-serve`` console script; returns the exit status."""
    from service.logging import configure_logging

    try:
        settings = Settings(**parse_args(argv))
    except (ValidationError, SettingsError) as exc:
        print(f"capsa-serve: invalid settings:\n{settings_problems(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.demo:
        from service.demo import DemoError, prepare_demo

        try:
            settings = settings.model_copy(update={"model_repository": prepare_demo(settings)})
        except DemoError as exc:
            print(f"capsa-serve: {exc}", file=sys.stderr)
            return 1
    if not settings.model_repository:
        print("capsa-serve: give --model-repository (or CAPSA_MODEL_REPOSITORY), or --demo", file=sys.stderr)
        return 2

    import numpy as np

    # This process only moves tensors; inputs and outputs are checked for finiteness explicitly, so a float64 to
    # float32 overflow in a JSON input is just an inf to refuse, not a RuntimeWarning on stderr.
    np.seterr(over="ignore")

    from service.app import create_app

    app: Any = create_app(settings)
    pool = None
    serves = settings.http_processes == 1 or settings.http_main_serves
    try:
        sock = bind_tcp(settings.host, settings.port, reuse_port=settings.http_processes > 1, listen=serves)
    except OSError as exc:
        log.error("cannot listen", extra={"host": settings.host, "port": settings.port, "error": str(exc)})
        return 1
    sockets = [sock] if serves else []
    if settings.http_processes > 1:  # secondary front ends on the same port (service.frontends)
        from service.frontends.primary import FrontendPool

        pool = FrontendPool(settings)
        pool.port = sock.getsockname()[1]
        app = pool.wrap(app)
        sockets.append(pool.http_socket)
    log.info("listening", extra={"host": settings.host, "port": sock.getsockname()[1],
                                 "http_processes": settings.http_processes})
    started = run_server(app, settings, sockets, on_signal=pool.signal if pool is not None else None)
    if not started:
        log.error("server failed to start")
        return 1
    log.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
