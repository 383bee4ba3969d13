#!/usr/bin/env python3
"""N forked workers call one HTTP API through one lim Dispatch.

The API here is a fake served on 127.0.0.1 by this script (http.server): it answers 429 with a
Retry-After header when more than --server-limit requests run at once, or on every 25th request,
as real APIs do. Every worker opens the same segment and Dispatch key, so together they never
run more than --concurrency requests at once (fewer, --throttled, while backing off), and a 429
seen by one worker backs all of them off via lim.parse_retry_after.

    python3 examples/python/http_workers.py --workers 8 --requests 20
    limctl show http-demo my_api        # meanwhile, from another terminal

Copy the `worker` function: it is all a real client needs.
"""

import argparse
import http.client
import http.server
import os
import sys
import threading
import time

import lim


class FakeApi(http.server.BaseHTTPRequestHandler):
    """POST /: 200 after a short delay; 429 + Retry-After when overloaded or every 25th call."""

    lock = threading.Lock()
    running = 0
    peak = 0
    calls = 0
    server_limit = 4
    delay = 0.02

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        cls = type(self)
        # Count this request as running from when its body has arrived until just before the
        # response goes out: a span inside the time the client holds its permit, so the peak
        # the server sees is a fair check of the client-side limit.
        with cls.lock:
            cls.running += 1
            cls.calls += 1
            cls.peak = max(cls.peak, cls.running)
            overloaded = cls.running > cls.server_limit or cls.calls % 25 == 0
        if not overloaded:
            time.sleep(cls.delay)
        with cls.lock:
            cls.running -= 1
        if overloaded:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def worker(segment: str, port: int, requests: int, concurrency: int, throttled: int) -> int:
    """One worker process: every request goes through the shared Dispatch. Returns its 429s."""
    seg = lim.Segment.open(segment)
    window = lim.BackoffWindow.for_key(seg, "my_api")
    api = lim.Dispatch.open(seg, limiter=window, key="my_api", concurrency=concurrency,
                            throttled_concurrency=throttled, byte_budget=1_000_000)
    throttled_responses = 0
    for i in range(requests):
        body = f"worker {os.getpid()} request {i}".encode()
        with api.permit(len(body)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/", body=body)
            response = conn.getresponse()
            response.read()
            conn.close()
        if response.status == 429:
            throttled_responses += 1
            api.set_backoff(lim.parse_retry_after(response.getheaders()) or 1.0)
    return throttled_responses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment", default="http-demo")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--throttled", type=int, default=1)
    parser.add_argument("--server-limit", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.02, help="server time per request, s")
    args = parser.parse_args()

    FakeApi.server_limit, FakeApi.delay = args.server_limit, args.delay
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    seg = lim.Segment.open_or_create(args.segment)
    print(f"segment {args.segment}: {args.workers} workers x {args.requests} requests, "
          f"concurrency {args.concurrency}, api on port {port}", flush=True)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                worker(args.segment, port, args.requests, args.concurrency, args.throttled)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
    server.shutdown()
    s = lim.Dispatch.open(seg, limiter=lim.BackoffWindow.for_key(seg, "my_api"), key="my_api",
                          concurrency=args.concurrency, throttled_concurrency=args.throttled,
                          byte_budget=1_000_000).snapshot()
    print(f"done: {FakeApi.calls} calls, server saw at most {FakeApi.peak} at once "
          f"(limit {args.concurrency}), failed workers {failed}, in flight now {s.in_flight}")
    return 0 if failed == 0 and FakeApi.peak <= args.concurrency and s.in_flight == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
