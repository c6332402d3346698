"""A webhook on loopback for the notification tests: a real ``http.server`` on 127.0.0.1 that
records each POST (path, content type, JSON body), answers with the statuses it is told, and can
hold requests to play a slow endpoint."""

from __future__ import annotations

import http.server
import json
import threading


class Webhook(http.server.ThreadingHTTPServer):
    """``answers``: the status of each next request (then 200); while ``hold`` is clear, requests
    wait (``arrived`` counts those that came in). Use as a context manager: it stops at the end."""

    daemon_threads = True

    def __init__(self):
        self.received: list[dict] = []
        self.arrived = 0
        self.answers: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook/T0/secret"

    def events(self, job: str, event: str | None = None) -> list[dict]:
        """The JSON bodies received for ``job`` (of ``event``), in arrival order."""
        return [r["body"] for r in list(self.received)
                if r["body"].get("job") == job and (event is None or r["body"].get("event") == event)]

    def close(self) -> None:
        self.hold.set()
        self.shutdown()
        self.server_close()

    def __enter__(self) -> Webhook:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # (http.server's name)
        server: Webhook = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server.arrived += 1
        server.hold.wait(30)
        server.received.append({"path": self.path, "type": self.headers["Content-Type"], "body": json.loads(body)})
        status = server.answers.pop(0) if server.answers else 200
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass
