"""Pairwise judges for win rates: an LLM behind any OpenAI-compatible endpoint, or a reward function.

The paper (Sec. 6.2, App. C.2) measures win rates against a baseline with GPT-4 as the judge: it sees the
prompt and two responses, writes a one-sentence comparison and names the one it prefers. LLM judges favour
a position, so every comparison here is asked in both orders (policy first, then baseline first): when the
two verdicts agree that is a win or a loss, when the verdict follows the position it is a tie (reported
separately). An answer without a "Preferred: A|B" line is counted as unparseable, never dropped silently.

Requests go to `<base_url>/chat/completions` with the standard library's HTTP client, several at once,
each bounded as a whole by `judge.timeout_seconds`, and retried with exponential backoff after HTTP 429,
5xx, timeouts and dropped connections. Every answer is checked (a string, or the multi-part list of text
parts) before it is appended to a JSONL cache keyed by (server, judge model, generation settings, the full
judge message: template, prompt, both texts and their order), so an interrupted evaluation resumes
without paying twice. The API key comes from the environment variable named by `judge.api_key_env`, goes
into the Authorization header to `base_url`'s origin only (a redirect elsewhere is refused), and is
redacted from every error, answer and message before it is printed, cached or logged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dpo_cli.config import JudgeConfig
from dpo_cli.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------
# Prompts (modelled on the structure of the paper's App. C.2; the wording is ours)
# ---------------------------------------------------------------------------------------------------------

_ANSWER_FORMAT = (
    "First write one sentence that compares the two {things} and says which one you prefer and why. "
    'Then write a final line that is exactly "Preferred: A" or "Preferred: B" and nothing else.'
)
TEMPLATES = {
    # The "concise" summarization variant.
    "summary": (
        "Which of the two summaries of the forum post below is better? A good summary states the post's "
        "most important points precisely and concisely and leaves out unimportant or irrelevant details.\n\n"
        "Post:\n{prompt}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n"
        + _ANSWER_FORMAT.format(things="summaries")
    ),
    # The "helpful" dialogue variant.
    "dialogue": (
        "Below is a conversation between a person and an AI assistant, followed by two candidate replies "
        "for the assistant's next turn. Which reply is more helpful to the person, while staying honest "
        "and harmless?\n\nConversation:\n{prompt}\n\nReply A:\n{a}\n\nReply B:\n{b}\n\n"
        + _ANSWER_FORMAT.format(things="replies")
    ),
}
_VERDICT_LINE = re.compile(r"^\W*preferred\W*([AB])\W*$", re.IGNORECASE | re.MULTILINE)
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_BACKOFF_SECONDS = 60.0
REDACTED = "[API key]"


def template_for(cfg: JudgeConfig, data_name: str) -> str:
    """The judge prompt's name: `judge.template`, or for `auto` summary on TL;DR and dialogue elsewhere."""
    if cfg.template != "auto":
        return cfg.template
    return "summary" if data_name == "tldr" else "dialogue"


def judge_message(template: str, prompt: str, a: str, b: str) -> str:
    return TEMPLATES[template].format(prompt=prompt.strip(), a=a.strip(), b=b.strip())


def parse_verdict(answer: str) -> str | None:
    """ "A" or "B" from the answer's last "Preferred: X" line (markdown and punctuation around it allowed);
    None when there is none."""
    found = _VERDICT_LINE.findall(answer or "")
    return found[-1].upper() if found else None


# ---------------------------------------------------------------------------------------------------------
# Outcomes and their statistics (pure functions)
# ---------------------------------------------------------------------------------------------------------

OUTCOMES = ("win", "loss", "tie", "unparseable", "error")


@dataclass(frozen=True)
class Comparison:
    """One comparison: the policy's completion against the baseline's for the same prompt."""

    prompt: str
    policy: str
    baseline: str


def outcome_of(winners: list[str | None], failed: bool = False) -> str:
    """A comparison's outcome from the winner ("policy" / "baseline" / None: unparseable) of each order
    asked: win or loss when all agree, tie when they disagree (the verdict followed the position)."""
    if failed:
        return "error"
    if any(w is None for w in winners):
        return "unparseable"
    if all(w == "policy" for w in winners):
        return "win"
    if all(w == "baseline" for w in winners):
        return "loss"
    return "tie"


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z = 1.96); (nan, nan) for n = 0. A tie counts as half
    a success, so `successes` may be fractional."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def summarize(outcomes: list[str]) -> dict[str, Any]:
    """Counts of each outcome and the win rate over judged comparisons (wins + ties / 2) / (wins + losses +
    ties), with its 95% Wilson interval. Unparseable and failed comparisons are counted, not judged."""
    counts = {name: sum(o == name for o in outcomes) for name in OUTCOMES}
    judged = counts["win"] + counts["loss"] + counts["tie"]
    successes = counts["win"] + counts["tie"] / 2
    low, high = wilson_interval(successes, judged)
    return {
        "win_rate": successes / judged if judged else math.nan,
        "ci_low": low,
        "ci_high": high,
        "judged": judged,
        "wins": counts["win"],
        "losses": counts["loss"],
        "ties": counts["tie"],
        "unparseable": counts["unparseable"],
        "errors": counts["error"],
    }


# ---------------------------------------------------------------------------------------------------------
# The answer cache
# ---------------------------------------------------------------------------------------------------------


class AnswerCache:
    """Judge answers by request key, in a JSONL file that only ever grows (a line cut short by a kill is
    skipped on the next load). Safe to use from several threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    if isinstance(row["answer"], str):  # answers cached before they were checked may not be
                        self.answers[row["key"]] = row["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, answer: str, model: str) -> None:
        with self._lock:
            self.answers[key] = answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "model": model, "answer": answer}) + "\n")


# ---------------------------------------------------------------------------------------------------------
# The LLM judge
# ---------------------------------------------------------------------------------------------------------


class ChatJudge:
    """Judges comparisons with an LLM behind an OpenAI-compatible chat-completions endpoint.

    `stats` counts HTTP requests sent (retries included), retries, and answers taken from the cache."""

    def __init__(self, cfg: JudgeConfig, template: str, cache_path: Path):
        self.cfg, self.template = cfg, template
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.cache = AnswerCache(cache_path)
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}
        self._stats_lock = threading.Lock()
        self._api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not self._api_key:
            print(f"judge: ${cfg.api_key_env} is not set; sending requests without an API key")
        self._opener = urllib.request.build_opener(_SameOriginRedirects(cfg.base_url))

    def _body(self, message: str) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": message}],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_answer_tokens,
        }

    def _key(self, body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps([self.cfg.base_url, body], sort_keys=True).encode()).hexdigest()

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self.stats[name] += 1

    def redact(self, text: str) -> str:
        """`text` without the API key (a server may echo the request, key and all)."""
        return text.replace(self._api_key, REDACTED) if self._api_key else text

    def _post(self, body: dict[str, Any]) -> str:
        """The answer to one request, within `judge.timeout_seconds` for the whole of it: the socket's own
        timeout bounds each read only, and a server sending a byte at a time would never time out."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        self._count("requests")
        outcome: dict[str, Any] = {}
        deadline = time.monotonic() + self.cfg.timeout_seconds

        def send() -> None:
            try:
                with self._opener.open(request, timeout=self.cfg.timeout_seconds) as response:
                    data = b""
                    while chunk := response.read1(1 << 16):
                        data += chunk
                        if time.monotonic() > deadline:  # let this thread end; the caller has moved on
                            raise TimeoutError
                outcome["data"] = data
            except BaseException as err:  # handed to the caller's thread
                outcome["error"] = err

        # A daemon thread: one stuck on a silent server never keeps the process from exiting.
        worker = threading.Thread(target=send, daemon=True)
        worker.start()
        worker.join(self.cfg.timeout_seconds)
        if worker.is_alive() or isinstance(outcome.get("error"), TimeoutError):
            raise TimeoutError
        if "error" in outcome:
            raise outcome["error"]
        return self.redact(_content(json.loads(outcome["data"].decode("utf-8"))))

    def _refused(self, err: urllib.error.HTTPError) -> ConfigError:
        """A 4xx that retrying cannot fix: wrong URL, model or key. Its body is shown (without the key)
        unless the error is about the key (servers echo part of a bad key)."""
        detail = ""
        if err.code not in (401, 403):
            detail = " ".join(self.redact(err.read().decode(errors="replace")).split())[:200]
        key_hint = f"; check ${self.cfg.api_key_env}" if err.code in (401, 403) else ""
        return ConfigError(
            f"judge.base_url={self.cfg.base_url} judge.model={self.cfg.model}: HTTP {err.code} {err.reason}"
            f"{' (' + detail + ')' if detail else ''}{key_hint}"
        )

    def ask(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        """(answer, None), or (None, the last error) once the retries are spent. HTTP 429/5xx, timeouts and
        dropped connections are retried with exponential backoff; other HTTP errors raise ConfigError."""
        error = ""
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count("retries")
            wait = self.cfg.backoff_seconds * 2**attempt
            try:
                return self._post(body), None
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS:
                    raise self._refused(err) from None
                error = f"HTTP {err.code} {err.reason}"
                retry_after = err.headers.get("Retry-After", "") if err.headers else ""
                if retry_after.replace(".", "", 1).isdigit():
                    wait = float(retry_after)
            except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
                error = f"no answer within judge.timeout_seconds={self.cfg.timeout_seconds}"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as err:
                error = f"connection failed ({getattr(err, 'reason', err)})"  # refused, reset, timed out
            except ConfigError:  # a redirect to another origin (_SameOriginRedirects)
                raise
            except (ValueError, KeyError, IndexError, TypeError):  # not JSON, not UTF-8, not a completion
                error = "the response is not a chat completion (no text in choices[0].message.content)"
            if attempt < self.cfg.max_retries:
                time.sleep(min(wait, MAX_BACKOFF_SECONDS))
        return None, self.redact(error)

    def _answer(self, key: str, body: dict[str, Any]) -> tuple[str | None, str | None]:
        answer, error = self.ask(body)
        if answer is not None:
            self.cache.put(key, answer, self.cfg.model)
        return answer, error

    def __call__(self, comparisons: list[Comparison]) -> list[dict[str, Any]]:
        """One judgment per comparison: both texts, each order's answer and winner, and the outcome."""
        # The orders asked per comparison: True = the policy's text is shown as A.
        rng = random.Random(self.cfg.seed)
        orders = [[True, False] if self.cfg.both_orders else [rng.random() < 0.5] for _ in comparisons]
        requests: dict[tuple[int, int], tuple[str, dict[str, Any]]] = {}
        for i, (c, policy_first_list) in enumerate(zip(comparisons, orders, strict=True)):
            for j, policy_first in enumerate(policy_first_list):
                a, b = (c.policy, c.baseline) if policy_first else (c.baseline, c.policy)
                body = self._body(judge_message(self.template, c.prompt, a, b))
                requests[i, j] = (self._key(body), body)

        answers: dict[tuple[int, int], tuple[str | None, str | None]] = {}
        missing = []
        for index, (key, _) in requests.items():
            cached = self.cache.get(key)
            if cached is None:
                missing.append(index)
            else:
                answers[index] = (cached, None)
                self._count("cache_hits")
        pool = ThreadPoolExecutor(max_workers=self.cfg.max_concurrency)
        try:
            futures = {pool.submit(self._answer, *requests[index]): index for index in missing}
            for future in tqdm(
                as_completed(futures), total=len(futures), desc="judging", leave=False, disable=None
            ):
                answers[futures[future]] = future.result()
        finally:
            # On a refused request (ConfigError) stop at once instead of sending the rest of the queue.
            pool.shutdown(wait=True, cancel_futures=True)

        if missing and all(answers[index][0] is None for index in missing):
            raise ConfigError(
                f"judge.base_url={self.cfg.base_url}: none of {len(missing)} requests was answered "
                f"(last error: {answers[missing[-1]][1]}); is the server running and judge.model right?"
            )
        judgments = []
        for i, c in enumerate(comparisons):
            raw = [answers[i, j][0] for j in range(len(orders[i]))]
            errors = [answers[i, j][1] for j in range(len(orders[i]))]
            verdicts = [parse_verdict(answer) if answer is not None else None for answer in raw]
            winners = [
                None if verdict is None else "policy" if (verdict == "A") == policy_first else "baseline"
                for verdict, policy_first in zip(verdicts, orders[i], strict=True)
            ]
            judgments.append(
                {
                    "prompt": c.prompt,
                    "policy": c.policy,
                    "baseline": c.baseline,
                    "orders": ["policy_first" if p else "baseline_first" for p in orders[i]],
                    "answers": raw,
                    "winners": winners,
                    "errors": [e for e in errors if e],
                    "outcome": outcome_of(winners, failed=any(a is None for a in raw)),
                }
            )
        return judgments


def _content(payload: dict[str, Any]) -> str:
    """The answer's text: `content` as a string, or the text parts of the multi-part format joined
    (`[{"type": "text", "text": ...}, ...]`); anything else raises TypeError before it is cached."""
    content = payload["choices"][0]["message"]["content"]
    if content is None:
        return ""
    if isinstance(content, list):
        texts = [
            part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"
        ]
        if texts and all(isinstance(text, str) for text in texts):
            return "".join(texts)
    if not isinstance(content, str):
        raise TypeError(f"content is {type(content).__name__}")
    return content


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects with every header, the API key's too: refuse one to another origin."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.origin = _origin(base_url)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != self.origin:
            raise ConfigError(
                f"judge.base_url={self.base_url}: the server redirects (HTTP {code}) to another origin "
                f"({_origin(newurl)}); the API key is only sent to {self.origin}: set judge.base_url to "
                "the endpoint itself"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname}:{port}"


# ---------------------------------------------------------------------------------------------------------
# The reward judge
# ---------------------------------------------------------------------------------------------------------


class RewardJudge:
    """The completion with the larger reward wins; equal rewards are a tie. Offline and exact."""

    def __init__(self, reward_fn: Callable[[list[str], list[str]], list[float]]):
        self.reward_fn = reward_fn
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0}

    def __call__(self, comparisons: list[Comparison]) -> list[dict[str, Any]]:
        prompts = [c.prompt for c in comparisons]
        policy_rewards = self.reward_fn(prompts, [c.policy for c in comparisons])
        baseline_rewards = self.reward_fn(prompts, [c.baseline for c in comparisons])
        judgments = []
        for c, mine, theirs in zip(comparisons, policy_rewards, baseline_rewards, strict=True):
            winner = "policy" if mine > theirs else "baseline" if theirs > mine else "tie"
            judgments.append(
                {
                    "prompt": c.prompt,
                    "policy": c.policy,
                    "baseline": c.baseline,
                    "orders": ["reward"],
                    "answers": [f"reward policy {mine:.4f} vs baseline {theirs:.4f}"],
                    "winners": [winner],
                    "errors": [],
                    "outcome": {"policy": "win", "baseline": "loss", "tie": "tie"}[winner],
                }
            )
        return judgments


Judge = Callable[[list[Comparison]], list[dict[str, Any]]]


def make_judge(cfg: JudgeConfig, *, data_name: str, cache_path: Path, reward_fn=None) -> Judge:
    """The judge of `cfg.name`: `openai` (an LLM; answers cached at `cache_path`) or `reward`."""
    if cfg.name == "reward":
        if reward_fn is None:
            raise ConfigError("judge=reward needs a reward function (reward=vader|siebert|hf_classifier)")
        return RewardJudge(reward_fn)
    if cfg.name == "openai":
        return ChatJudge(cfg, template_for(cfg, data_name), cache_path)
    raise ConfigError(f"judge.name={cfg.name}: choose openai or reward")
