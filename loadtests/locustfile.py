"""Locust load test of a loraplex server over gRPC.

Users (pick some by class name on the command line, or run them all; ``--admin-users`` fixes the admin count):

  StreamUser  GenerateStream on an adapter: "GenerateStream ttft" (first message) and "GenerateStream e2e" entries
  UnaryUser   Generate on an adapter: "Generate"
  OpenAIUser  streaming chat completions on an adapter over the OpenAI-compatible HTTP API at --http-host:
              "POST /v1/chat/completions stream ttft" and "... e2e" entries
  RouteUser   Generate through an A/B route with stable user_keys: "Generate route"; a key that moves to another
              variant is a failure. The route is --route, or one this test creates (SetRoute) and deletes again
  AdminUser   loads, replaces (rewrites the files under --churn-root, then LoadAdapter: a new version) and unloads
              adapters reserved for churn (--churn-prefix), never the ones the other users send traffic to

Adapters: --adapter-count ids PREFIX0000... (the names ``python -m loadtests.synthetic_adapters`` writes), chosen
with Zipf popularity (--zipf-s; 0 = uniform). Prompt length in words and max_new_tokens come from distributions
(--prompt-words, --max-new-tokens; see loadtests/workload.py). Every option also reads LORAPLEX_LOADTEST_<NAME>.

Headless runs check thresholds at the end (--max-failure-ratio, --max-p95-ttft-ms, --max-p99-e2e-ms, --min-rps)
and exit 1 when one is missed, 0 otherwise:

    locust -f loadtests/locustfile.py --headless --host 127.0.0.1:50051 -u 8 -r 4 -t 60s --csv out/run \\
        --adapter-count 64 --zipf-s 1.1 --max-p95-ttft-ms 2000 --max-failure-ratio 0.01
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
from locust import between, events, task
from locust.env import Environment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # loadtests.*: this file's siblings

from loadtests.adapter_files import rewrite_weights  # noqa: E402
from loadtests.entries import (  # noqa: E402
    ADMIN_GENERATE,
    ADMIN_LOAD,
    ADMIN_REPLACE,
    ADMIN_UNLOAD,
    E2E_NAMES,
    E2E_SUFFIX,
    HTTP_STREAM,
    ROUTED,
    STREAM,
    TTFT_NAMES,
    TTFT_SUFFIX,
    UNARY,
)
from loadtests.grpc_user import CheckFailed, GrpcUser  # noqa: E402
from loadtests.http_user import chat_body, stream_chunks  # noqa: E402
from loadtests.thresholds import Thresholds, observe, violations  # noqa: E402
from loadtests.workload import Distribution, RequestMix, adapter_ids, prompt_text  # noqa: E402
from loraplex.client import Client, Route, Variant  # noqa: E402
from loraplex.client.types import GenerateOptions  # noqa: E402

log = logging.getLogger("loraplex.loadtest")

CREATED_ROUTE = "loadtest-ab"

OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("adapter-prefix", str, "synthetic-", "traffic adapters are PREFIX0000, PREFIX0001, ..."),
    ("adapter-count", int, 8, "how many traffic adapters"),
    ("zipf-s", float, 1.0, "Zipf exponent of adapter popularity (0 = uniform)"),
    ("prompt-words", str, "uniform:8:48", "prompt length in words (distribution)"),
    ("max-new-tokens", str, "uniform:8:32", "max_new_tokens per request (distribution)"),
    ("http-host", str, "", "the server's HTTP API for OpenAIUser, http://HOST:PORT (its --http-port)"),
    ("ignore-eos", int, 1, "1: generate exactly max_new_tokens (EOS ignored)"),
    ("think-time", str, "0.1:0.5", "seconds a user waits between its requests, LO:HI"),
    ("request-timeout", float, 120.0, "deadline of one call in seconds"),
    ("route", str, "", "an existing A/B route for RouteUser; empty: create one from --route-adapters"),
    ("route-adapters", str, "", "adapters of the created route's two variants, A,B; empty: the first two"),
    ("route-keys", int, 50, "stable user_keys RouteUser sends (user-0 ... user-N-1)"),
    ("churn-prefix", str, "churn-", "adapters reserved for AdminUser: PREFIX0000, ..."),
    ("churn-count", int, 4, "how many churn adapters"),
    ("churn-root", str, "", "directory holding the churn adapters (to rewrite them); empty: no replace step"),
    ("admin-users", int, 1, "AdminUser instances (fixed count, taken from -u)"),
    ("seed", int, 0, "seed of every user's random choices"),
    ("max-failure-ratio", float, None, "fail the run above this ratio of failed calls"),
    ("max-p95-ttft-ms", float, None, "fail the run above this p95 time to first token"),
    ("max-p99-e2e-ms", float, None, "fail the run above this p99 end-to-end latency of generation calls"),
    ("min-rps", float, None, "fail the run below this many generation requests per second"),
)


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    for flag, kind, default, text in OPTIONS:
        env = "LORAPLEX_LOADTEST_" + flag.upper().replace("-", "_")
        parser.add_argument(f"--{flag}", type=kind, default=default, env_var=env, help=f"{text} (env {env})")


class Plan:
    """The parsed options every user reads (set once at init)."""

    mix: ClassVar[RequestMix]
    ignore_eos: ClassVar[bool] = True
    seeds: ClassVar[itertools.count[int]] = itertools.count()
    seed: ClassVar[int] = 0
    route: ClassVar[str] = ""
    http_host: ClassVar[str] = ""
    route_adapters: ClassVar[tuple[str, ...]] = ()
    created_route: ClassVar[bool] = False
    route_keys: ClassVar[tuple[str, ...]] = ()
    sticky: ClassVar[dict[str, str]] = {}  # user_key -> the variant it was first served by
    churn_pool: ClassVar[list[str]] = []
    churn_root: ClassVar[Path | None] = None
    limits: ClassVar[Thresholds] = Thresholds()

    @classmethod
    def rng(cls) -> random.Random:
        return random.Random(cls.seed * 1_000_003 + next(cls.seeds))


@events.init.add_listener
def _configure(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # used as a library (tests): configure() is called explicitly
        return
    configure(options)


def configure(options: Any) -> None:
    Plan.mix = RequestMix(
        adapter_ids(options.adapter_prefix, options.adapter_count),
        options.zipf_s,
        Distribution.parse(options.prompt_words),
        Distribution.parse(options.max_new_tokens),
    )
    Plan.ignore_eos = bool(options.ignore_eos)
    Plan.seed = options.seed
    Plan.route = options.route
    Plan.http_host = options.http_host
    Plan.route_keys = tuple(f"user-{k}" for k in range(options.route_keys))
    Plan.churn_pool = adapter_ids(options.churn_prefix, options.churn_count)
    Plan.churn_root = Path(options.churn_root) if options.churn_root else None
    Plan.limits = Thresholds(
        options.max_failure_ratio, options.max_p95_ttft_ms, options.max_p99_e2e_ms, options.min_rps
    )
    low, _, high = options.think_time.partition(":")
    for user in (StreamUser, UnaryUser, OpenAIUser, RouteUser, AdminUser):
        user.wait_time = between(float(low), float(high or low))
    GrpcUser.request_timeout = options.request_timeout
    AdminUser.fixed_count = options.admin_users
    if not Plan.route:
        pair = options.route_adapters.split(",") if options.route_adapters else list(Plan.mix.adapters[:2])
        Plan.route_adapters = tuple(pair)


@events.test_start.add_listener
def _create_route(environment: Environment, **_: Any) -> None:
    """Creates the A/B route RouteUser needs, unless --route names one (or no RouteUser runs)."""
    if Plan.route or RouteUser not in environment.user_classes or environment.host is None:
        return
    first, second = (Plan.route_adapters * 2)[:2]
    route = Route(CREATED_ROUTE, (Variant("a", first, 50.0), Variant("b", second, 50.0)))
    with Client(environment.host.removeprefix("grpc://")) as client:
        client.set_route(route)
    Plan.route, Plan.created_route = CREATED_ROUTE, True
    log.info("created route %s: a=%s b=%s (50/50)", CREATED_ROUTE, first, second)


@events.test_stop.add_listener
def _delete_route(environment: Environment, **_: Any) -> None:
    if Plan.created_route and environment.host is not None:
        with Client(environment.host.removeprefix("grpc://")) as client:
            client.delete_route(Plan.route)
        Plan.created_route = False


@events.quitting.add_listener
def _check_thresholds(environment: Environment, **_: Any) -> None:
    seen = observe(environment.stats, TTFT_NAMES, E2E_NAMES)
    log.info(
        "generation: %d requests, %.2f requests/s, %d tokens generated; calls %d, failed %d",
        seen.generation_requests,
        seen.generation_rps,
        GrpcUser.generated_tokens,
        seen.calls,
        seen.failures,
    )
    if Plan.limits.is_empty():
        return
    problems = violations(Plan.limits, seen)
    for problem in problems:
        log.error("threshold missed: %s", problem)
    environment.process_exit_code = 1 if problems else 0
    if not problems:
        log.info("all thresholds met")


class _TrafficUser(GrpcUser):
    abstract = True

    def on_start(self) -> None:
        super().on_start()
        self.rng = Plan.rng()

    def next_request(self) -> tuple[str, GenerateOptions]:
        """The next prompt and its options: an adapter by popularity, lengths by their distributions."""
        draw = Plan.mix.draw(self.rng)
        return draw.prompt, {
            "adapter": draw.adapter,
            "max_new_tokens": draw.max_new_tokens,
            "ignore_eos": Plan.ignore_eos,
        }


class StreamUser(_TrafficUser):
    weight = 3

    @task
    def send_stream(self) -> None:
        prompt, options = self.next_request()
        self.stream(STREAM, prompt, **options)


class UnaryUser(_TrafficUser):
    weight = 1

    @task
    def send_unary(self) -> None:
        prompt, options = self.next_request()
        self.generate(UNARY, prompt, **options)


class OpenAIUser(_TrafficUser):
    """The stream user's traffic over HTTP: the same draws, timed the same way (first chunk with a token, end)."""

    weight = 1
    http: httpx.Client

    def on_start(self) -> None:
        super().on_start()
        if not Plan.http_host:
            raise ValueError("set the server's HTTP API with --http-host http://HOST:PORT")
        self.http = httpx.Client(base_url=Plan.http_host, timeout=GrpcUser.request_timeout)

    def on_stop(self) -> None:
        self.http.close()
        super().on_stop()

    @task
    def send_chat_stream(self) -> None:
        draw = Plan.mix.draw(self.rng)
        body = chat_body(draw.adapter, draw.prompt, draw.max_new_tokens, Plan.ignore_eos)
        started, first_seen, length = time.perf_counter(), False, 0
        try:
            for chunk in stream_chunks(self.http, body):
                text = "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])
                if text and not first_seen:
                    first_seen = True
                    self.fire(HTTP_STREAM + TTFT_SUFFIX, started)
                length += len(text.encode())
                if chunk.get("usage"):
                    GrpcUser.generated_tokens += chunk["usage"]["completion_tokens"]
        except Exception as error:
            if not first_seen:
                self.fire(HTTP_STREAM + TTFT_SUFFIX, started, 0, error)
            self.fire(HTTP_STREAM + E2E_SUFFIX, started, length, error)
            return
        self.fire(HTTP_STREAM + E2E_SUFFIX, started, length)


class RouteUser(_TrafficUser):
    weight = 1

    @task
    def send_routed(self) -> None:
        draw = Plan.mix.draw(self.rng)
        key = self.rng.choice(Plan.route_keys)
        with self.timed(ROUTED) as call:
            result = self.client.generate(
                draw.prompt,
                route=Plan.route,
                user_key=key,
                max_new_tokens=draw.max_new_tokens,
                ignore_eos=Plan.ignore_eos,
            )
            call.length = len(result.text.encode())
            variant = result.served_by.variant or ""
            first = Plan.sticky.setdefault(key, variant)
            if variant != first:
                raise CheckFailed(f"user_key {key} moved from variant {first} to {variant}")


class AdminUser(GrpcUser):
    """One cycle per task on a churn adapter it holds alone: load, replace (new version), serve it, unload."""

    weight = 0
    fixed_count = 1
    generation = 0

    @task
    def churn(self) -> None:
        if not Plan.churn_pool:
            return
        adapter = Plan.churn_pool.pop(0)
        try:
            self._cycle(adapter)
        finally:
            Plan.churn_pool.append(adapter)

    def _cycle(self, adapter: str) -> None:
        version: int | None = None
        with self.timed(ADMIN_LOAD):
            version = self.client.load_adapter(adapter).version
        if version is not None and Plan.churn_root is not None:
            previous, version = version, None
            with self.timed(ADMIN_REPLACE):
                AdminUser.generation += 1
                rewrite_weights(Plan.churn_root / adapter, 1.01 if AdminUser.generation % 2 else 1 / 1.01)
                replaced = self.client.load_adapter(adapter).version
                if replaced <= previous:
                    raise CheckFailed(f"{adapter}: rewritten files still serve version {replaced} (was {previous})")
                version = replaced
        if version is None:
            return
        with self.timed(ADMIN_GENERATE):
            result = self.client.generate(prompt_text(8, random.Random(version)), adapter=adapter, max_new_tokens=2)
            if result.served_by.adapter_version != version:
                raise CheckFailed(f"{adapter}: served version {result.served_by.adapter_version}, expected {version}")
        with self.timed(ADMIN_UNLOAD):
            self.client.unload_adapter(adapter)
