"""A plain HTTP server over a folder that cannot list it (404 for every folder), as
object-store gateways and CDNs behave, counting the requests it answers."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _NoListing(http.server.SimpleHTTPRequestHandler):
    counter: list[int]

    def send_head(self):  # type: ignore[no-untyped-def]
        self.counter[0] += 1
        path = self.translate_path(self.path)
        if os.path.isdir(path):  # never a folder listing, never index.html
            self.send_error(404, "no listing here")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops the connections of a burst of concurrent
    # requests (the readers' concurrent rounds), which the client's TCP retries after a
    # second: a stall no CDN or gateway has.
    request_queue_size = 128


@contextmanager
def serve_without_listing(folder: str) -> Iterator[tuple[str, list[int]]]:
    """``("http://127.0.0.1:PORT", [requests answered])`` while the server runs."""
    counter = [0]
    handler = type("Handler", (_NoListing,), {"counter": counter})
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counter
    finally:
        server.shutdown()
        server.server_close()
