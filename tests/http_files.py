"""A real HTTP/1.1 file server on 127.0.0.1 for tests of ``tools.fetch``, with switchable faults.

It serves raw bytes by URL path over real TCP in a background thread, so the fetcher's
streaming, caps, timeouts and truncation handling are exercised end to end (no mocks in
the client). Every request is recorded, so a test can assert that a warm cache made none.

    with FileServer() as server:
        server.add("/owner/repo/<sha>/path.py", b"...")                  # 200 with Content-Length
        server.add("/big", b"x" * 10_000, fault=NO_LENGTH)              # no Content-Length, closes
        server.add("/cut", b"x" * 1000, fault=TRUNCATED)                 # promises 1000, sends 500
        server.add("/slow", b"x" * 50, fault=SLOW)                       # one byte per slow_delay_s
        server.add("/lie", b"x" * 10, fault=HUGE_LENGTH)                 # declares 10**9 bytes
        server.redirect("/old", "/new")                                  # 301 to a path
        client.get(server.base_url + "/missing")                         # 404
        assert server.paths() == ["/owner/repo/<sha>/path.py", ...]

``closed_port()`` returns a port on 127.0.0.1 where nothing listens (an unreachable host).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NO_LENGTH = "no-length"  # body without Content-Length, delimited by closing the connection
TRUNCATED = "truncated"  # Content-Length says N, half the body is sent, then the socket closes
SLOW = "slow"  # Content-Length is right, but each byte comes after slow_delay_s
HUGE_LENGTH = "huge-length"  # declares a 1 GB Content-Length (sends the real, small body)
FAULTS = frozenset({NO_LENGTH, TRUNCATED, SLOW, HUGE_LENGTH})


class FileServer:
    """Serve ``{path: bytes}`` on 127.0.0.1; unknown paths get 404. Use as a context manager."""

    def __init__(self, slow_delay_s: float = 0.05):
        self._files: dict[str, tuple[bytes, str | None]] = {}
        self._redirects: dict[str, str] = {}
        self._requests: list[str] = []
        self._lock = threading.Lock()
        self.slow_delay_s = slow_delay_s
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -------------------------------------------------------------
    def add(self, path: str, body: bytes, fault: str | None = None) -> None:
        """Serve ``body`` at ``path`` (which must start with "/"), optionally with a fault."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(FAULTS)}")
        with self._lock:
            self._files[path] = (bytes(body), fault)

    def redirect(self, path: str, location: str) -> None:
        """Answer ``path`` with 301 and this Location (absolute URL or path)."""
        with self._lock:
            self._redirects[path] = location

    # -- observation ---------------------------------------------------------------
    def paths(self) -> list[str]:
        """The request paths seen so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> FileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # silence stderr
                return

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                server._serve(self)

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- request handling ----------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self._requests.append(h.path)
            redirect = self._redirects.get(h.path)
            found = self._files.get(h.path)
        try:
            if redirect is not None:
                h.send_response(301)
                h.send_header("Location", redirect)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            if found is None:
                body = b"404: Not Found"
                h.send_response(404)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
                return
            body, fault = found
            h.send_response(200)
            h.send_header("Content-Type", "text/plain; charset=utf-8")
            if fault == NO_LENGTH:
                h.send_header("Connection", "close")
                h.end_headers()
                h.wfile.write(body)
                h.close_connection = True
            elif fault == TRUNCATED:
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body[: len(body) // 2])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
            elif fault == SLOW:
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                for i in range(len(body)):
                    h.wfile.write(body[i : i + 1])
                    h.wfile.flush()
                    time.sleep(self.slow_delay_s)
            elif fault == HUGE_LENGTH:
                h.send_header("Content-Length", str(10**9))
                h.end_headers()
                h.wfile.write(body)
                h.close_connection = True
            else:
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            h.close_connection = True  # the client gave up (cap or deadline): expected in tests


class _QuietServer(ThreadingHTTPServer):
    """Threaded server that treats a client hanging up (a refused download) as normal."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


def closed_port() -> int:
    """A TCP port on 127.0.0.1 with no listener (bound once to pick it, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
