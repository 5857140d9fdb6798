"""A minimal webhook receiver that checks Coupon-Signature (standard library only).

    python scripts/webhook_receiver.py --port 9000 --secret "$WEBHOOK_SECRET"

It answers 204 to a correctly signed POST (printing each event) and 400 otherwise, and 200 to
any GET (a readiness probe). Copy `verify` into your own receiver; deduplicate on the event
id, since delivery is at least once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verify(secret: str, body: bytes, header: str, tolerance_s: int = 300) -> bool:
    """Coupon-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        sent_at = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - sent_at) > tolerance_s:  # an old, replayed request
        return False
    expected = hmac.new(secret.encode(), f"{sent_at}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), fields.get("v1", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--quiet", action="store_true", help="do not print events")
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        # Keeps the connection open between POSTs, as a production receiver would: a sender
        # then does not pay a new TCP connection for every batch.
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if not verify(args.secret, body, self.headers.get("Coupon-Signature", "")):
                self.send_response(400)
                self.send_header("Content-Length", "0")
            else:
                if not args.quiet:
                    for event in json.loads(body)["events"]:
                        print(json.dumps(event, ensure_ascii=False), flush=True)
                self.send_response(204)
            self.end_headers()

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on http://127.0.0.1:{args.port}/", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
