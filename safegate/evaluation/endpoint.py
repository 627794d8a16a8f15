"""One HTTP client for OpenAI-compatible endpoints (`GET /models`, `POST /chat/completions`), used by every API judge.

Standard library only (urllib), bounded timeouts. Transient failures (connection errors, timeouts, HTTP 408, 429
and 5xx) are retried with exponential backoff; any other failure, and the last transient one, raises
`EndpointError` naming the URL and the cause. Both judge families use it: the refusal judges of
`safegate.evaluation.judges` and the safety judges of `safegate.defenses.judges`.

Example:
    >>> def transport(url, payload, headers, timeout):  # stands in for the network
    ...     return {"choices": [{"message": {"content": " REFUSAL "}}]}
    >>> endpoint = ChatEndpoint("http://localhost:8000/v1/chat/completions", api_key="", transport=transport)
    >>> endpoint.base_url, endpoint.chat("m", [{"role": "user", "content": "Hi"}], max_tokens=4)
    ('http://localhost:8000/v1', 'REFUSAL')
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})

Transport = Callable[[str, "dict[str, Any] | None", dict[str, str], float], dict[str, Any]]
"""`transport(url, payload, headers, timeout) -> reply`: POST `payload` as JSON (GET when it is `None`)."""


class EndpointError(RuntimeError):
    """A request to an endpoint failed (after the retries, if the failure was transient); names URL and cause."""


def urllib_transport(
    url: str, payload: dict[str, Any] | None, headers: dict[str, str], timeout: float
) -> dict[str, Any]:
    """The default transport: one urllib request, the reply parsed as JSON."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 - the user's endpoint
        return json.loads(reply.read().decode("utf-8"))


def is_transient(err: BaseException) -> bool:
    """Whether a failed request may succeed when tried again (network trouble, overload, server errors)."""
    if isinstance(err, urllib.error.HTTPError):
        return err.code in RETRY_STATUS
    return isinstance(err, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException))


def describe(err: BaseException) -> str:
    """`Type: first line of the message`, for error messages."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


class ChatEndpoint:
    """An OpenAI-compatible API root such as `http://localhost:8000/v1`.

    Args:
        base_url (`str | None`): the API root, or its full `.../chat/completions` URL (default
            `$OPENAI_BASE_URL`, else `https://api.openai.com/v1`).
        api_key (`str | None`): bearer token (default `$OPENAI_API_KEY`; `""` sends none, as local servers want).
        timeout (`float`): seconds per HTTP request.
        retries (`int`): extra tries after a transient failure.
        backoff (`float`): seconds before the first retry; doubled for each further one, at most `max_backoff`.
        transport: `fn(url, payload, headers, timeout) -> reply dict` (default: `urllib_transport`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        transport: Transport | None = None,
    ) -> None:
        base = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.base_url = base.removesuffix("/chat/completions")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.transport = transport or urllib_transport

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, path: str, payload: dict[str, Any] | None = None, retries: int | None = None) -> dict[str, Any]:
        """The JSON reply of `GET path` (`payload=None`) or `POST path`; `EndpointError` when it fails."""
        url = self.base_url + path
        tries = 1 + (self.retries if retries is None else retries)
        for attempt in range(tries):
            try:
                reply = self.transport(url, payload, self.headers(), self.timeout)
            except (OSError, ValueError, http.client.HTTPException) as err:
                if attempt + 1 == tries or not is_transient(err):
                    raise EndpointError(f"request to {url} failed ({describe(err)}).") from err
                time.sleep(min(self.backoff * 2.0**attempt, self.max_backoff))
                continue
            if not isinstance(reply, dict):
                raise EndpointError(f"request to {url}: expected a JSON object, got {type(reply).__name__}.")
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def models(self) -> list[str]:
        """The model ids `GET /models` lists (no retries: used to fail fast before any work starts)."""
        listed = self.request("/models", retries=0)
        return [m["id"] for m in listed.get("data", []) if isinstance(m, dict) and m.get("id")]

    def chat(self, model: str, messages: list[dict[str, Any]], max_tokens: int, temperature: float = 0.0) -> str:
        """The assistant's reply text (stripped) to `messages`."""
        payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        reply = self.request("/chat/completions", payload)
        try:
            return str(reply["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            url = f"{self.base_url}/chat/completions"
            raise EndpointError(
                f"{url}: the reply has no `choices[0].message.content` ({str(reply)[:200]})."
            ) from None
