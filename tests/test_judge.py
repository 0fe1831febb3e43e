"""The LLM judge's real HTTP client against an OpenAI-compatible server on 127.0.0.1 with scripted answers."""

import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dpo_cli.config import JudgeConfig
from dpo_cli.errors import ConfigError
from dpo_cli.judge import ChatJudge, Comparison, RewardJudge, parse_verdict, summarize, wilson_interval

# A reply: (HTTP status, the assistant's answer or an error body, seconds to wait before replying).
Reply = tuple[int, str, float]
_TEXTS = re.compile(r"(?:Summary|Reply) A:\n(.*?)\n\n(?:Summary|Reply) B:\n(.*?)\n\n", re.DOTALL)


@dataclass
class FakeJudgeServer:
    """Speaks POST /v1/chat/completions; `script(request_number, body)` decides each reply."""

    script: Callable[[int, dict], Reply] = lambda number, body: (200, "Fine.\nPreferred: A", 0.0)
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def reply(self, body: dict, headers: dict) -> Reply:
        with self.lock:
            self.bodies.append(body)
            self.headers.append(headers)
            number = len(self.bodies)
        return self.script(number, body)


def serve(server: FakeJudgeServer) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, text, delay_seconds = server.reply(body, dict(self.headers))
            time.sleep(delay_seconds)
            if status == 200:
                payload = {
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                }
            else:
                payload = {"error": {"message": text}}
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    return httpd


@pytest.fixture
def fake_server() -> Iterator[FakeJudgeServer]:
    server = FakeJudgeServer()
    httpd = serve(server)
    yield server
    httpd.shutdown()
    httpd.server_close()


def judge_for(server: FakeJudgeServer, tmp_path: Path, **overrides) -> ChatJudge:
    settings = {
        "base_url": server.url,
        "model": "fake-judge",
        "api_key_env": "DPO_CLI_TEST_JUDGE_KEY",
        "max_concurrency": 4,
        "timeout_seconds": 5.0,
        "max_retries": 3,
        "backoff_seconds": 0.01,
    }
    return ChatJudge(JudgeConfig(**(settings | overrides)), "summary", tmp_path / "cache.jsonl")


def prefers_good(number: int, body: dict) -> Reply:
    """A judge that reads the texts: it prefers the one containing GOOD, whatever its position."""
    a, b = _TEXTS.search(body["messages"][0]["content"]).groups()
    return 200, f"One is clearly better.\nPreferred: {'A' if 'GOOD' in a else 'B'}", 0.0


def comparisons(n: int, policy_good: int = 0) -> list[Comparison]:
    """n comparisons; the first `policy_good` have the better (GOOD) text on the policy's side."""
    return [
        Comparison(
            f"Post {i}: my cat sleeps all day.",
            *(("GOOD cat", "bad") if i < policy_good else ("bad", "GOOD cat")),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("Summary A is tighter.\nPreferred: A", "A"),
        ("B covers the main point.\n**Preferred:** B", "B"),
        ("Comparison: ...\npreferred: b.", "B"),
        ("Preferred: A\nOn reflection...\nPreferred: B", "B"),  # the last verdict line counts
        ("I like both.", None),
        ("Preferred: Both", None),
        ("Preferred: A or B", None),
        ("", None),
    ],
)
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_win_rate_counts_ties_as_half_and_has_a_wilson_interval():
    """60 wins, 40 losses: p = 0.6, n = 100, z = 1.96: centre (0.6 + 0.0192) / 1.0384 = 0.5963, half-width
    1.96 * sqrt(0.0024 + 0.000096) / 1.0384 = 0.0943 -> [0.5020, 0.6906]."""
    summary = summarize(["win"] * 60 + ["loss"] * 40 + ["unparseable"] * 3 + ["error"])
    assert summary["win_rate"] == pytest.approx(0.6)
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((0.5020, 0.6906), abs=1e-4)
    assert (summary["judged"], summary["unparseable"], summary["errors"]) == (100, 3, 1)
    assert summarize(["tie"] * 10 + ["win"] * 10)["win_rate"] == pytest.approx(0.75)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_a_purely_position_biased_judge_gives_50_percent_with_both_orders(fake_server, tmp_path):
    fake_server.script = lambda number, body: (200, "The first one reads better.\nPreferred: A", 0.0)
    judgments = judge_for(fake_server, tmp_path)(comparisons(10, policy_good=10))
    summary = summarize([j["outcome"] for j in judgments])
    assert summary["win_rate"] == 0.5 and summary["ties"] == 10 and summary["wins"] == 0
    assert len(fake_server.bodies) == 20  # two orders per comparison
    assert judgments[0]["winners"] == ["policy", "baseline"]
    assert judgments[0]["orders"] == ["policy_first", "baseline_first"]


def test_a_judge_that_reads_the_texts_is_mapped_back_to_policy_and_baseline(fake_server, tmp_path):
    fake_server.script = prefers_good
    judgments = judge_for(fake_server, tmp_path)(comparisons(8, policy_good=6))
    summary = summarize([j["outcome"] for j in judgments])
    assert (summary["wins"], summary["losses"], summary["ties"]) == (6, 2, 0)
    assert summary["win_rate"] == 0.75
    assert judgments[0]["answers"][0].endswith("Preferred: A") and judgments[0]["answers"][1].endswith("B")
    # One order per comparison (seeded random order) halves the requests and keeps the verdicts.
    one_order = judge_for(fake_server, tmp_path / "one", both_orders=False)(comparisons(8, policy_good=6))
    assert [j["outcome"] for j in one_order] == [j["outcome"] for j in judgments]
    assert len(fake_server.bodies) == 16 + 8
    assert {j["orders"][0] for j in one_order} == {"policy_first", "baseline_first"}


def test_http_429_and_500_are_retried_until_an_answer_comes(fake_server, tmp_path):
    replies = {1: (429, "slow down", 0.0), 2: (500, "overloaded", 0.0), 3: (503, "again", 0.0)}
    fake_server.script = lambda number, body: replies.get(number, (200, "Tighter.\nPreferred: A", 0.0))
    judge = judge_for(fake_server, tmp_path, both_orders=False, seed=1)
    [judgment] = judge(comparisons(1, policy_good=1))
    assert judgment["outcome"] in ("win", "loss") and judgment["errors"] == []
    assert judge.stats == {"requests": 4, "retries": 3, "cache_hits": 0}


def test_a_timeout_is_retried_and_a_lasting_one_is_reported(fake_server, tmp_path):
    # The first request hangs past the client's timeout; its retry is answered.
    fake_server.script = lambda number, body: (200, "Fine.\nPreferred: A", 1.0 if number == 1 else 0.0)
    judge = judge_for(fake_server, tmp_path, timeout_seconds=0.3, both_orders=False)
    [judgment] = judge(comparisons(1))
    assert judgment["outcome"] in ("win", "loss") and judge.stats["retries"] == 1

    # Post 1 never gets an answer in time: counted as an error, the others are judged.
    def script(number, body):
        slow = "Post 1:" in body["messages"][0]["content"]
        return 200, "Fine.\nPreferred: A", 1.0 if slow else 0.0

    fake_server.script = script
    judge = judge_for(fake_server, tmp_path / "slow", timeout_seconds=0.3, max_retries=1)
    judgments = judge(comparisons(3))
    assert [j["outcome"] for j in judgments] == ["tie", "error", "tie"]
    assert "no answer within judge.timeout_seconds=0.3" in judgments[1]["errors"][0]
    assert summarize([j["outcome"] for j in judgments])["errors"] == 1

    # Nothing answered at all: one line saying so, instead of a win rate of nothing.
    fake_server.script = lambda number, body: (500, "down", 0.0)
    with pytest.raises(ConfigError, match="none of 2 requests was answered"):
        judge_for(fake_server, tmp_path / "down", max_retries=1)(comparisons(1))


def test_malformed_answers_are_counted_not_dropped(fake_server, tmp_path):
    answers = ["Both are fine.", "Preferred: A", "Summary A, I suppose", "Preferred: B"]
    fake_server.script = lambda number, body: (200, answers[(number - 1) % 4], 0.0)
    judgments = judge_for(fake_server, tmp_path, max_concurrency=1)(comparisons(4))
    summary = summarize([j["outcome"] for j in judgments])
    assert summary["unparseable"] == 4 and summary["judged"] == 0 and math.isnan(summary["win_rate"])
    assert judgments[0]["answers"] == ["Both are fine.", "Preferred: A"]
    assert judgments[0]["winners"] == [None, "baseline"]


def test_the_cache_makes_a_second_run_send_no_requests(fake_server, tmp_path):
    fake_server.script = prefers_good
    first = judge_for(fake_server, tmp_path)(comparisons(5, policy_good=3))
    assert len(fake_server.bodies) == 10
    second_judge = judge_for(fake_server, tmp_path)  # a new process would load the same file
    second = second_judge(comparisons(5, policy_good=3))
    assert len(fake_server.bodies) == 10 and second_judge.stats["cache_hits"] == 10
    assert second == first
    # Only what is new is asked: one more comparison costs its two orders.
    judge_for(fake_server, tmp_path)(comparisons(6, policy_good=3))
    assert len(fake_server.bodies) == 12


def test_the_api_key_goes_in_the_header_only_and_a_refusal_stops_at_once(fake_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CLI_TEST_JUDGE_KEY", "sk-test-secret")
    fake_server.script = prefers_good
    judgments = judge_for(fake_server, tmp_path)(comparisons(2))
    assert {h["Authorization"] for h in fake_server.headers} == {"Bearer sk-test-secret"}
    assert "sk-test-secret" not in (tmp_path / "cache.jsonl").read_text() + json.dumps(judgments)
    assert fake_server.bodies[0]["model"] == "fake-judge" and fake_server.bodies[0]["temperature"] == 0.0

    fake_server.script = lambda number, body: (401, "Incorrect API key provided: sk-tes***cret", 0.0)
    with pytest.raises(ConfigError) as err:
        judge_for(fake_server, tmp_path / "refused", max_concurrency=1)(comparisons(20))
    message = str(err.value)
    assert "HTTP 401" in message and "DPO_CLI_TEST_JUDGE_KEY" in message and "sk-" not in message
    assert len(fake_server.bodies) < 4 + 40  # not retried, the queue is cancelled


def test_reward_judge_compares_rewards():
    judge = RewardJudge(lambda prompts, texts: [float(len(t)) for t in texts])
    judgments = judge(
        [Comparison("p", "longer", "short"), Comparison("p", "a", "bb"), Comparison("p", "x", "y")]
    )
    assert [j["outcome"] for j in judgments] == ["win", "loss", "tie"]


# Issue 22 (9-12): servers that misbehave in ways that leaked the key, hung, or poisoned the cache.
KEY = "sk-test-secret-0123456789"


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable], str]]:
    """`start(respond)`: a server on 127.0.0.1 whose every POST is `respond(handler, body_bytes)`, writing
    whatever bytes it likes; returns its /v1 URL. `start.posts` counts the requests of all servers."""
    servers = []

    def start(respond: Callable) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                start.posts.append(self.server.server_address[1])
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client left
                    respond(self, self.rfile.read(int(self.headers["Content-Length"])))

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/v1"

    start.posts = []
    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def send(handler, status: int, data: bytes, **headers: str) -> None:
    handler.send_response(status)
    for name, value in ({"Content-Length": str(len(data))} | headers).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def completion(content) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def raw_judge(url: str, tmp_path: Path, **overrides) -> ChatJudge:
    settings = {"base_url": url, "model": "m", "api_key_env": "DPO_CLI_TEST_JUDGE_KEY", "max_retries": 0,
                "backoff_seconds": 0.01, "timeout_seconds": 5.0}  # fmt: skip
    return ChatJudge(JudgeConfig(**(settings | overrides)), "summary", tmp_path / "cache.jsonl")


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_to_another_origin_is_refused_and_gets_no_key(raw_server, tmp_path, monkeypatch, status):
    """(9) urllib copied the Authorization header into a redirect to another host."""
    monkeypatch.setenv("DPO_CLI_TEST_JUDGE_KEY", KEY)
    elsewhere = raw_server(lambda h, body: send(h, 200, completion("Preferred: A")))
    url = raw_server(lambda h, body: send(h, status, b"", Location=f"{elsewhere}/chat/completions"))
    with pytest.raises(ConfigError, match=f"redirects \\(HTTP {status}\\) to another origin") as err:
        raw_judge(url, tmp_path)(comparisons(1))
    assert "\n" not in str(err.value)
    assert raw_server.posts and all(port == int(url.split(":")[2].split("/")[0]) for port in raw_server.posts)


def test_the_key_is_redacted_from_errors_answers_and_the_cache(raw_server, tmp_path, monkeypatch):
    """(10) a 4xx body that echoes the request went into the error line (and wandb's console capture)."""
    monkeypatch.setenv("DPO_CLI_TEST_JUDGE_KEY", KEY)
    echo_400 = raw_server(
        lambda h, body: send(h, 400, f"bad request from {h.headers['Authorization']}".encode())
    )
    with pytest.raises(ConfigError) as err:
        raw_judge(echo_400, tmp_path)(comparisons(1))
    assert "HTTP 400" in str(err.value) and "Bearer [API key]" in str(err.value) and KEY not in str(err.value)

    echo_200 = raw_server(
        lambda h, body: send(h, 200, completion(f"{h.headers['Authorization']}\nPreferred: A"))
    )
    judgments = raw_judge(echo_200, tmp_path)(comparisons(1))
    assert judgments[0]["answers"][0].startswith("Bearer [API key]")
    assert KEY not in (tmp_path / "cache.jsonl").read_text() + json.dumps(judgments)


def test_a_server_that_trickles_bytes_times_out_as_a_whole(raw_server, tmp_path):
    """(11) judge.timeout_seconds bounded each socket read: a byte every 0.1 s held the stage forever."""

    def trickle(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        for _ in range(200):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.1)

    started = time.monotonic()
    answer, error = raw_judge(raw_server(trickle), tmp_path, timeout_seconds=0.5).ask({"model": "m"})
    assert answer is None and error == "no answer within judge.timeout_seconds=0.5"
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (completion([{"type": "text", "text": "B is better.\n"}, {"type": "text", "text": "Preferred: B"}]),
         "B is better.\nPreferred: B"),
        (completion(5), None),
        (completion(["Preferred: A"]), None),
        (b"\xff\xfe not utf-8", None),
    ],
)  # fmt: skip
def test_answers_are_checked_before_they_are_cached(raw_server, tmp_path, data, answer):
    """(12) a numeric or list content was cached, then crashed every later run; a non-UTF-8 body was a
    traceback. The multi-part format (a list of text parts) is read."""
    judge = raw_judge(raw_server(lambda h, body: send(h, 200, data)), tmp_path)
    got, error = judge.ask({"model": "m"})
    assert got == answer
    if answer is None:
        assert error.startswith("the response is not a chat completion")


def test_a_non_string_answer_in_an_old_cache_is_asked_again(raw_server, tmp_path):
    url = raw_server(lambda h, body: send(h, 200, completion("Preferred: A")))
    judge = raw_judge(url, tmp_path)
    key = judge._key(judge._body("x"))
    (tmp_path / "cache.jsonl").write_text(json.dumps({"key": key, "model": "m", "answer": 5}) + "\n")
    assert raw_judge(url, tmp_path).cache.get(key) is None
