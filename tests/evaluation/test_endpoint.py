"""The one HTTP client of the API judges (`safegate.evaluation.endpoint`) and the lazy defense registry."""

import subprocess
import sys
import urllib.error

import pytest

from safegate.evaluation import endpoint as E
from safegate.evaluation.defense import DEFENSES, get_defense_factory


def _flaky(failures):
    """A transport that raises each of `failures` in turn, then answers."""
    calls = []

    def transport(url, payload, headers, timeout):
        calls.append((url, payload, headers, timeout))
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return {"choices": [{"message": {"content": "ok"}}], "data": [{"id": "m1"}, {"id": "m2"}]}

    return transport, calls


def test_transient_failures_are_retried_with_backoff(monkeypatch):
    sleeps = []
    monkeypatch.setattr(E.time, "sleep", sleeps.append)
    busy = urllib.error.HTTPError("http://x/v1/chat/completions", 503, "busy", {}, None)
    transport, calls = _flaky([busy, ConnectionError("reset")])
    endpoint = E.ChatEndpoint("http://x/v1/", api_key="k", retries=2, backoff=0.5, transport=transport)
    assert endpoint.chat("m", [{"role": "user", "content": "hi"}], max_tokens=3) == "ok"
    assert len(calls) == 3 and sleeps == [0.5, 1.0]
    url, payload, headers, _ = calls[0]
    assert url == "http://x/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert payload["messages"] == [{"role": "user", "content": "hi"}]
    assert (payload["model"], payload["max_tokens"], payload["temperature"]) == ("m", 3, 0.0)


def test_permanent_failures_and_bad_replies_raise_a_clear_error(monkeypatch):
    monkeypatch.setattr(E.time, "sleep", lambda s: None)
    denied = urllib.error.HTTPError("http://x/v1/chat/completions", 401, "unauthorized", {}, None)
    transport, calls = _flaky([denied])
    with pytest.raises(E.EndpointError, match=r"http://x/v1/chat/completions failed \(HTTPError: HTTP Error 401"):
        E.ChatEndpoint("http://x/v1", api_key="", retries=3, transport=transport).chat("m", [], max_tokens=1)
    assert len(calls) == 1  # not retried
    transport, calls = _flaky([TimeoutError("slow")] * 5)
    with pytest.raises(E.EndpointError, match="TimeoutError: slow"):
        E.ChatEndpoint("http://x/v1", api_key="", retries=1, transport=transport).chat("m", [], max_tokens=1)
    assert len(calls) == 2  # one retry, then the error
    empty = E.ChatEndpoint("http://x/v1", api_key="", transport=lambda *a: {"choices": []})
    with pytest.raises(E.EndpointError, match=r"no `choices\[0\].message.content`"):
        empty.chat("m", [], max_tokens=1)
    assert isinstance(E.EndpointError("x"), RuntimeError)


def test_models_are_listed_without_retries(monkeypatch):
    transport, calls = _flaky([])
    endpoint = E.ChatEndpoint("http://x/v1", api_key="", transport=transport)
    assert endpoint.models() == ["m1", "m2"] and calls[0][1] is None  # a GET
    transport, calls = _flaky([ConnectionRefusedError("refused")])
    with pytest.raises(E.EndpointError, match="refused"):
        E.ChatEndpoint("http://x/v1", api_key="", retries=3, transport=transport).models()
    assert len(calls) == 1


def test_defenses_are_named_by_module_path_and_imported_only_when_asked():
    assert all(isinstance(DEFENSES[name], str) for name in ("casa", "safecode", "safesteer", "none"))
    with pytest.raises(ValueError, match=r"unknown defense 'nope'; choose from \['casa', "):
        get_defense_factory("nope")
    with pytest.raises(ValueError, match="cannot import the factory"):
        get_defense_factory("safegate.defenses.factories:no_such_factory")
    code = (
        "import sys, safegate.evaluation as ev; assert 'safegate.defenses' not in sys.modules; "
        "before = dict(ev.defense.DEFENSES); import safegate.defenses; assert ev.defense.DEFENSES == before; "
        "assert ev.defense.get_defense_factory('none').__module__ == 'safegate.defenses.factories'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
