"""The Serve app on a real local Ray cluster, driven by the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
from typing import Any

import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.util.state import list_actors
from serving_cluster import API_KEY, APP, MODEL, PLAN_V0, PLAN_V1, ServingCluster, wait_running
from transformers import PreTrainedTokenizerFast

from llama4_serving.config import ServingConfig
from llama4_serving.engines.reference.engine import ReferenceEngine, RequestOutput
from llama4_serving.engines.reference.expert_parallel import SHARD_NAMESPACE
from llama4_serving.engines.reference.loader import load_model, load_tokenizer
from llama4_serving.engines.reference.model import BatchedLlama4
from llama4_serving.engines.reference.sampling import SamplingParams

PROMPT = "Ray Serve replicas answer"


@pytest.fixture(scope="module")
def client(serving_cluster: ServingCluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{serving_cluster.base_url}/v1", api_key=API_KEY, timeout=60, max_retries=0
    )


@pytest.fixture(scope="module")
def tokenizer(serving_cluster: ServingCluster) -> PreTrainedTokenizerFast:
    return load_tokenizer(ServingConfig.model_validate(serving_cluster.args))


@pytest.fixture(scope="module")
def local_engine(serving_cluster: ServingCluster) -> ReferenceEngine:
    """The same checkpoint run in this process with no expert parallelism."""
    config = ServingConfig.model_validate(serving_cluster.args)
    return ReferenceEngine(
        BatchedLlama4(load_model(config)), load_tokenizer(config), config.batching
    )


def _local_text(engine: ReferenceEngine, prompt_ids: list[int], params: SamplingParams) -> str:
    outputs: list[RequestOutput] = []
    engine.add_request("local", prompt_ids, params, outputs.append)
    engine.run_until_idle()
    return "".join(o.text for o in outputs)


def _llm_server() -> Any:
    return serve.get_deployment_handle("LLMServer", app_name=APP)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_counts_usage_and_repeats_with_a_seed(
    client: openai.OpenAI, tokenizer: PreTrainedTokenizerFast
) -> None:
    def complete(seed: int) -> openai.types.Completion:
        return client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed
        )

    first, again, other = complete(5), complete(5), complete(6)
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].text != other.choices[0].text
    assert first.usage is not None
    assert first.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert first.choices[0].finish_reason in {"length", "stop"}
    if first.choices[0].finish_reason == "length":
        assert first.usage.completion_tokens == 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_streamed_completion_equals_the_unstreamed_one(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.8, top_p=0.9, seed=11
    )
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0.8,
            top_p=0.9,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage


def test_chat_streams_and_answers_with_usage(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello, world!"},
    ]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0.7, seed=3
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0.7,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert chunks[-1].usage == whole.usage
    assert whole.usage is not None
    assert whole.usage.prompt_tokens > 4  # the chat template wraps the two messages
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 8


def test_stop_string_ends_the_completion_before_it(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    text = plain.choices[0].text
    stop = text[6:9]
    stopped = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_image_parts_are_accepted_by_the_schema_and_refused_by_the_engine(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                    ],
                }
            ],
        )


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"logprobs": True, "top_logprobs": 2}, "logprobs, top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
        ),
    ],
)
def test_what_the_reference_engine_does_not_serve_is_a_400_naming_it(
    client: openai.OpenAI, fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=f"{named}: not served by the reference"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **fields
        )


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({}, b'{"model": "tiny-llama4", "prompt": "x"}', 401, "API key"),
        ({"Authorization": "Bearer wrong"}, b'{"model": "tiny-llama4"}', 401, "API key"),
        (None, b'{"model": "tiny-llama4", "prompt": ', 400, "JSON"),
        (None, b'{"model": "tiny-llama4"}', 400, "prompt"),
        (None, b'{"model": "tiny-llama4", "prompt": "x", "temperature": 9}', 400, "temperature"),
        (None, b'{"model": "tiny-llama4", "prompt": "x", "n": 3}', 400, "n"),
        (None, b'{"model": "gpt-9", "prompt": "x"}', 404, "tiny-llama4"),
        (None, b'{"model": "tiny-llama4", "prompt": [1, 2, 99999]}', 400, "token ids"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(
    serving_cluster: ServingCluster,
    headers: dict[str, str] | None,
    body: bytes,
    status: int,
    message: str,
) -> None:
    response = httpx.post(
        f"{serving_cluster.base_url}/v1/completions",
        content=body,
        headers={
            "Content-Type": "application/json",
            **(headers if headers is not None else {"Authorization": f"Bearer {API_KEY}"}),
        },
        timeout=30,
    )
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_too_long_prompt_is_refused_with_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="at most 127"):
        client.completions.create(model=MODEL, prompt=[5] * 200, max_tokens=4)


def test_shards_run_on_the_nodes_the_plan_names(serving_cluster: ServingCluster) -> None:
    info = _llm_server().shard_info.remote().result(timeout_s=60)
    assert info["version"] == PLAN_V0["version"]
    actors = {
        a.actor_id: a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
    }
    per_node = PLAN_V0["gpus_per_node"]
    for shard in info["shards"]:
        actor = actors[shard["actor_id"]]  # Ray's own record of where the actor lives
        assert actor.class_name == "ExpertShard"
        # GPU q of the plan is on plan node q // gpus_per_node, the node labelled with it.
        assert serving_cluster.worker_labels[str(actor.node_id)] == str(shard["gpu"] // per_node)
    assert len({a["node_id"] for a in info["shards"]}) == 2


def test_expert_parallel_outputs_equal_the_plain_model(
    client: openai.OpenAI, tokenizer: PreTrainedTokenizerFast, local_engine: ReferenceEngine
) -> None:
    prompt_ids = tokenizer.encode("Mixture of experts models")
    for temperature, seed in [(0.0, None), (1.0, 21)]:
        served = client.completions.create(
            model=MODEL, prompt=prompt_ids, max_tokens=16, temperature=temperature, seed=seed
        )
        params = SamplingParams(max_tokens=16, temperature=temperature, seed=seed)
        assert served.choices[0].text == _local_text(local_engine, prompt_ids, params)


def test_metrics_are_served_on_the_replica_port(client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    host, port = _llm_server().metrics_address.remote().result(timeout_s=30)
    text = httpx.get(f"http://{host}:{port}/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    names = {s.name for s in samples}
    for name in (
        "llama4_prompt_tokens_total",
        "llama4_generation_tokens_total",
        "llama4_request_duration_seconds_bucket",
        "llama4_time_to_first_token_seconds_bucket",
        "llama4_time_per_output_token_seconds_bucket",
        "llama4_requests_running",
        "llama4_requests_waiting",
        "llama4_kv_cache_usage_ratio",
    ):
        assert name in names
    routed_layers = {
        s.labels["layer"] for s in samples if s.name == "llama4_expert_routed_tokens_total"
    }
    assert routed_layers == {"1", "3"}  # the MoE layers of the tiny model
    # Prometheus' own linter (Debian's `prometheus` package) accepts the names and units.
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _stream_text(client: openai.OpenAI, seed: int, max_tokens: int) -> str:
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=1.0, seed=seed, stream=True
    )
    return "".join(c.choices[0].text for c in stream if c.choices)


def _expected(
    engine: ReferenceEngine, tokenizer: PreTrainedTokenizerFast, seeds: list[int], tokens: int
) -> list[str]:
    ids = tokenizer.encode(PROMPT)
    return [_local_text(engine, ids, SamplingParams(max_tokens=tokens, seed=s)) for s in seeds]


def _replica_actor_ids() -> set[str]:
    return {
        a.actor_id
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name.endswith("LLMServer")
    }


def test_new_plan_applies_live_and_loses_no_request(
    serving_cluster: ServingCluster,
    client: openai.OpenAI,
    tokenizer: PreTrainedTokenizerFast,
    local_engine: ReferenceEngine,
) -> None:
    seeds = list(range(100, 116))
    expected = _expected(local_engine, tokenizer, seeds, 100)
    replicas = _replica_actor_ids()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # A stream of requests, four at a time, while the new plan is applied.
        futures = [pool.submit(_stream_text, client, seed, 100) for seed in seeds]
        time.sleep(1.0)
        serving_cluster.deploy(
            user_config={"batching": serving_cluster.args["batching"], "placement": PLAN_V1}
        )
        deadline = time.monotonic() + 120
        while _llm_server().shard_info.remote().result(timeout_s=60)["version"] != 1:
            assert time.monotonic() < deadline, "plan version 1 never became active"
            time.sleep(0.2)
        pending_at_swap = sum(not f.done() for f in futures)
        texts = [f.result(timeout=240) for f in futures]
    assert pending_at_swap > 0  # the swap happened with requests in flight
    assert texts == expected
    wait_running()
    assert _replica_actor_ids() == replicas  # reconfigured in place, not replaced
    info = _llm_server().shard_info.remote().result(timeout_s=60)
    assert all(shard["versions"] == [1] for shard in info["shards"])  # old weights freed


def test_killed_shard_comes_back_and_requests_fail_over(
    client: openai.OpenAI, tokenizer: PreTrainedTokenizerFast, local_engine: ReferenceEngine
) -> None:
    seeds = list(range(200, 209))
    expected = _expected(local_engine, tokenizer, seeds, 100)
    shard = _llm_server().shard_info.remote().result(timeout_s=60)["shards"][0]
    victim = next(
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
        if a.actor_id == shard["actor_id"]
    )
    handle = ray.get_actor(str(victim.name), namespace=SHARD_NAMESPACE)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_stream_text, client, seed, 100) for seed in seeds]
        time.sleep(1.0)
        pending_at_kill = sum(not f.done() for f in futures)
        ray.kill(handle, no_restart=False)  # a crash: Ray restarts the actor
        texts = [f.result(timeout=240) for f in futures]
    assert pending_at_kill > 0
    # Calls in flight were retried on the restarted shard, which reloaded the current plan
    # (it was created under plan version 0 and restarts with those weights).
    assert texts == expected
    deadline = time.monotonic() + 60
    while True:
        actor = next(a for a in list_actors(limit=1000, detail=True) if a.name == victim.name)
        if actor.state == "ALIVE" and int(actor.num_restarts) >= 1:
            break
        assert time.monotonic() < deadline, f"shard state {actor.state}"
        time.sleep(1)
