"""The remote backend: one or more vLLM servers, over the OpenAI-compatible /v1/completions.

Prompts go as token ids (`prompt: list[list[int]]`), many per request, greedy (temperature 0 and
every other sampling parameter neutral, so the server's generation-config defaults cannot apply),
an explicit max_tokens (vLLM's default is 16) and `return_token_ids`, so a hybrid prefix is
never decoded and re-tokenised. Requests are spread over the replicas concurrently. A pooled
requests Session retries connection errors, timeouts and 5xx with backoff (urllib3 Retry); a
request that still fails yields None for its prompts, which marks their samples invalid.

task=prepare also asks a draft for K tokens (`ignore_eos`, max_tokens K) and a target for its
greedy token at every draft position: the prompt is context + draft, `prompt_logprobs: 1`
returns, at every prompt position, the prompt's own token and the rank-1 token (0 would return
the prompt's token only), and max_tokens 1 keeps the generation to one token.

Start a server the way the checks below expect:
    python -m vllm.entrypoints.openai.api_server --model PATH --served-model-name NAME
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from spd_lightning.errors import SetupError
from spd_lightning.models.hf import tokenizer_eos_ids

log = logging.getLogger(__name__)

# Strings whose tokenisation must agree between the server and the local tokenizer.
DEFAULT_PROBES = ("Q: 37+45= A: so the total is 82.", "Hello, world! 1234", " leading space and\nnewline")

# Turns one choice of a /v1/completions answer (and the prompt it answers) into token ids.
Parse = Callable[[dict, list[int]], list[int]]


def _generated(choice: dict, prompt: list[int]) -> list[int]:
    return list(choice["token_ids"])


def _exactly(k: int, choice: dict, prompt: list[int]) -> list[int]:
    ids = list(choice["token_ids"])
    if len(ids) != k:
        raise ValueError(f"asked for {k} tokens with ignore_eos, got {len(ids)} (prompt too close to max_model_len?)")
    return ids


def _rank_one(position: dict) -> int:
    """The rank-1 token of one prompt position: {"token id": {"logprob", "rank", ...}}. On a tie
    the smallest id, as torch's argmax picks."""
    best = [int(token) for token, entry in position.items() if entry["rank"] == 1]
    if not best:
        raise ValueError("a prompt_logprobs entry has no rank-1 token (server ignored prompt_logprobs: 1?)")
    return min(best)


def _top_of_last(k: int, choice: dict, prompt: list[int]) -> list[int]:
    """The rank-1 tokens predicting the last k prompt tokens (the draft block)."""
    rows = choice.get("prompt_logprobs")
    if not isinstance(rows, list) or len(rows) != len(prompt):
        raise ValueError("answer lacks prompt_logprobs, one per prompt token (vLLM too old?)")
    return [_rank_one(row) for row in rows[len(prompt) - k :]]


# Greedy means greedy: a server applies the sampling defaults of the model's generation_config.json
# (Qwen2.5-Instruct ships repetition_penalty 1.05, top_p, top_k) to every request that does not set
# each of them, and a repetition penalty changes the argmax even at temperature 0.
GREEDY = {
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def _unusable(what: str, err: object) -> str:
    """One message for a start-up request that failed after its retries."""
    reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return (
        f"the vLLM server failed a start-up check: {what} gave {reason}. Look at the server's log, "
        "restart it if it is unhealthy, or point target.url at a working server"
    )


def _base_url(url: str) -> str:
    """http://host:8000/v1 or http://host:8000 -> http://host:8000"""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class VLLMTarget:
    def __init__(
        self,
        url: str | None = None,
        urls: list[str] | None = None,
        model: str = "target",
        max_new_tokens: int = 16,
        stop: list[str] | None = None,
        prompts_per_request: int = 64,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        startup_timeout_s: float = 10.0,
        api_key_env: str | None = "VLLM_API_KEY",
    ) -> None:
        bases = [_base_url(u) for u in ([url] if url else []) + list(urls or [])]
        if not bases:
            raise SetupError("target=vllm needs target.url=http://HOST:PORT/v1 (or target.urls=[...])")
        self.bases, self.model, self.max_new_tokens, self.stop = bases, model, max_new_tokens, stop
        # End-of-sequence ids besides the served tokenizer's EOS (set by check_tokenizer).
        self.stop_token_ids: list[int] = []
        self.prompts_per_request, self.timeout_s = prompts_per_request, timeout_s
        # Logical requests (urllib3's retries of one request are not counted again).
        self.num_requests = self.num_failed_requests = 0
        self._lock = threading.Lock()
        key = os.environ.get(api_key_env) if api_key_env else None
        self.session = requests.Session()
        if key:  # the key lives in the environment only: never in the config, logs or repr
            self.session.headers["Authorization"] = f"Bearer {key}"
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff_s,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=None,
            raise_on_status=False,
        )
        adapter = HTTPAdapter(max_retries=retry, pool_connections=len(bases), pool_maxsize=concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vllm")
        for base in bases:
            self._check_server(base, startup_timeout_s, api_key_env)

    # --- start-up checks: each failure is one message naming the URL and what to do ---

    def _get(self, base: str, path: str, timeout: float) -> requests.Response:
        # Start-up checks must answer within seconds: no retry loop of the data path here.
        return requests.get(base + path, timeout=timeout, headers=dict(self.session.headers))

    def _check_server(self, base: str, startup_timeout_s: float, api_key_env: str | None) -> None:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if self._get(base, "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise SetupError(
                    f"no vLLM server answers at {base} (GET /health, waited {startup_timeout_s:.0f}s). Start one "
                    f"with `python -m vllm.entrypoints.openai.api_server --model PATH --served-model-name "
                    f"{self.model}` or fix target.url"
                )
            time.sleep(0.5)
        try:
            resp = self._get(base, "/v1/models", timeout=5)
        except requests.RequestException as err:
            raise SetupError(_unusable(f"GET {base}/v1/models", err)) from None
        if resp.status_code == 401:
            raise SetupError(f"{base} wants an API key: export {api_key_env or 'VLLM_API_KEY'}=... (vLLM --api-key)")
        if resp.status_code >= 500:
            raise SetupError(_unusable(f"GET {base}/v1/models", f"status {resp.status_code}"))
        try:
            names = [m.get("id") for m in resp.json().get("data", [])]
        except (ValueError, AttributeError):
            raise SetupError(f"{base}/v1/models answered {resp.status_code} without a model list: not vLLM?") from None
        if self.model not in names:
            raise SetupError(
                f"{base} serves {names}, not {self.model!r}: set target.model to one of them, or start the "
                f"server with --served-model-name {self.model}"
            )

    def check_tokenizer(self, tokenizer, role: str = "target", probes: tuple[str, ...] = DEFAULT_PROBES) -> None:
        """The server must tokenise like the local tokenizer, or token ids mean different things.
        Also learns the other ids that end a response (generation_config's list beside the tokenizer),
        so completions stop there whatever generation config the server was started with."""
        self.stop_token_ids = sorted(tokenizer_eos_ids(tokenizer) - {tokenizer.eos_token_id})
        # The EOS token decides where completions stop: its text must map to the same id too.
        probes = tuple(probes) + ((tokenizer.eos_token,) if tokenizer.eos_token else ())
        for base in self.bases:
            for text in probes:
                remote, local = self._tokenize(base, text), tokenizer(text, add_special_tokens=False).input_ids
                if remote != local:
                    raise SetupError(
                        f"tokenizer mismatch: {base} tokenises {text!r} as {remote[:12]}..., the local tokenizer "
                        f"as {local[:12]}.... Serve the {role} with the tokenizer of model.tokenizer."
                    )

    def _tokenize(self, base: str, text: str) -> list[int]:
        """The server's token ids of text (POST /tokenize, after the session's retries)."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        try:
            resp = self.session.post(base + "/tokenize", json=body, timeout=10)
            resp.raise_for_status()
            return list(resp.json()["tokens"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as err:
            raise SetupError(_unusable(f"POST {base}/tokenize (the tokenizer check)", err)) from None

    # --- the data path ---

    def _request(self, base: str, prompts: list[list[int]], params: dict, parse: Parse) -> list[list[int] | None]:
        body = {"model": self.model, "prompt": prompts, **GREEDY, "return_token_ids": True, **params}
        try:
            resp = self.session.post(base + "/v1/completions", json=body, timeout=(5.0, self.timeout_s))
            if 400 <= resp.status_code < 500:
                # Our request is wrong (too long for max_model_len, unknown model...): retrying
                # cannot help and marking samples invalid would hide it.
                raise SetupError(f"{base}/v1/completions refused the request ({resp.status_code}): {resp.text[:300]}")
            resp.raise_for_status()
            choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts) or any("token_ids" not in c for c in choices):
                raise ValueError("answer lacks one choice with token_ids per prompt (vLLM too old?)")
            return [parse(choice, prompt) for choice, prompt in zip(choices, prompts)]
        except (requests.RequestException, ValueError, KeyError, TypeError) as err:
            with self._lock:
                self.num_failed_requests += 1
            log.warning("vLLM request to %s failed after retries (%d prompts): %s", base, len(prompts), err)
            return [None] * len(prompts)

    def _map(self, prompts: list[list[int]], params: dict, parse: Parse) -> list[list[int] | None]:
        """Sends `prompts` in chunks over the replicas concurrently; one parsed answer per prompt."""
        # Small steps still use every replica: at least one chunk per server when there is work.
        size = max(1, min(self.prompts_per_request, -(-len(prompts) // len(self.bases))))
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        replicas = itertools.cycle(self.bases)
        futures = [self.pool.submit(self._request, next(replicas), chunk, params, parse) for chunk in chunks]
        self.num_requests += len(chunks)
        return [answer for f in futures for answer in f.result()]

    def complete(self, prefixes: list[list[int]], max_new_tokens: int | None = None) -> list[list[int] | None]:
        """Greedy completions ending with EOS, or `max_new_tokens` long (None: self.max_new_tokens)."""
        params = {"max_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens}
        if self.stop:
            params["stop"] = list(self.stop)
        if self.stop_token_ids:
            params["stop_token_ids"] = self.stop_token_ids
        return self._map(prefixes, params, _generated)

    def propose(self, contexts: list[list[int]], k: int) -> list[list[int] | None]:
        """k greedy tokens after each context; EOS and stop strings do not end them."""
        return self._map(contexts, {"max_tokens": k, "ignore_eos": True}, partial(_exactly, k))

    def argmax_along(self, contexts: list[list[int]], drafts: list[list[int]]) -> list[list[int] | None]:
        """[i] = greedy token after context + draft[:i], from the prompt logprobs of context + draft."""
        if not contexts:
            return []
        k = len(drafts[0])
        if any(len(d) != k for d in drafts):
            raise ValueError("argmax_along: every draft of one call must have the same length")
        prompts = [list(c) + list(d) for c, d in zip(contexts, drafts)]
        return self._map(prompts, {"max_tokens": 1, "prompt_logprobs": 1}, partial(_top_of_last, k))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()
