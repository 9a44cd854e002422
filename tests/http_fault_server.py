"""A small OpenAI-compatible chat server that misbehaves on request (tests only).

The behaviour is chosen by a marker in the user message, "mode=<name>":
  ok        200 with "... [[A]]"
  429       first request 429 with Retry-After: 1, then ok
  500       first request 500, then ok
  timeout   never answers within the client's timeout
  garbage   200 with a body that is not JSON
  empty     200 with an empty completion
  reasoning 200 with the chain of thought in ``reasoning_content`` (as reasoning models return it)
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self):
        self.calls: dict[str, list[float]] = {}
        self.auth: set[str] = set()
        self.models: list[str] = []
        # An outage: while set, every request gets 503.
        self.down = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                mode = re.search(r"mode=(\w+)", text).group(1)
                with server.lock:
                    server.auth.add(self.headers.get("Authorization", ""))
                    server.models.append(body["model"])
                    n = len(server.calls.setdefault(text, []))
                    server.calls[text].append(time.monotonic())
                if server.down:
                    return self._send(503, {"error": {"message": "service unavailable"}})
                if mode == "429" and n == 0:
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
                if mode == "500" and n == 0:
                    return self._send(500, {"error": {"message": "boom"}})
                if mode == "timeout":
                    time.sleep(3)
                    return self._send(200, {})
                if mode == "garbage":
                    return self._raw(200, b"<html>not json")
                # A model named "answers-X" always answers X; any other answers A.
                letter = body["model"].removeprefix("answers-") if body["model"].startswith("answers-") else "A"
                content = "" if mode == "empty" else f"Thinking step by step. [[{letter}]]"
                message = {"role": "assistant", "content": content}
                if mode == "reasoning":
                    message = {
                        "role": "assistant",
                        "content": f"[[{letter}]]",
                        "reasoning_content": "Option B looks tempting: [[B]]? No, the first one.",
                    }
                return self._send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": i, "finish_reason": "stop", "message": message} for i in range(body.get("n", 1))
                        ],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
                    },
                )

            def _send(self, code, obj, headers=None):
                self._raw(code, json.dumps(obj).encode(), headers)

            def _raw(self, code, data, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
