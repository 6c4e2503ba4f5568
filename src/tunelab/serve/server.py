"""Run the app on uvicorn, and shut it down gracefully.

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, lets in-flight requests -- streams included --
finish (up to --shutdown-timeout), then runs the app's shutdown, and we exit 0. uvicorn re-raises the
signal it caught once it is done, so that the default handler kills the process with it (exit status 143);
a handler of our own that does nothing makes that last step a no-op, and the exit is a clean 0.
"""

from __future__ import annotations

import signal
import socket
import sys

from tunelab.serve.state import ServeSettings, ServerState


def bind(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so port 0 (any free port) can be reported before the first request."""
    from tunelab.errors import TunelabError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TunelabError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings, announce=print) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit status (0 = clean stop, 2 = a model failed to load)."""
    import uvicorn

    from tunelab.serve.app import create_app

    state = ServerState(settings)
    app = create_app(state)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    server = uvicorn.Server(config)
    failed: list[str] = []

    def fatal(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    state.on_fatal = fatal
    def ready() -> None:
        for served in state.registry.models():
            if getattr(served.trained, "precision_note", None):  # e.g. a bf16 run served on a CPU without native bf16
                announce(f"note: {served.name}: {served.trained.precision_note}")
        announce(f"ready: {', '.join(state.registry.names())} ({state.registry.bases_loaded} shared base model(s) "
                 "in memory)")

    state.on_ready = ready
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # see the module docstring
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    announce(f"tunelab serve: listening on {url} (playground {url}/, API {url}/v1, docs {url}/docs); "
             f"loading {len(settings.sources)} model(s)")
    server.run(sockets=[sock])
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return 2
    return 0
