"""The default engine, served for real: the operator deploys a tiny `engine: vllm`
Llama4Deployment (manifests/samples/tiny-vllm.yaml) to a real Ray cluster in external-Ray mode;
vLLM's CPU build runs it through Ray Serve LLM, and the official `openai` client uses the OpenAI
surface users expect. The live autoscaler then scales it 1 -> 2 -> 1 on vLLM's own token counters
read from a real Prometheus (scraping Ray's metrics agents), and the first engine replica serves
throughout.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image
from prometheus_server import PrometheusApi, prometheus
from ray_serve import RayServe, ray_serve_cluster

from llama4_operator.devenv.cluster import LocalCluster
from llama4_operator.monitoring import dashboards, rules
from llama4_operator.monitoring.rules import GENERATED_TOKENS_RATE
from llama4_operator.monitoring.selectors import Selectors
from llama4_operator.renderers.children import Owner, external_app_name, external_route_prefix
from support import REPO, Kubectl, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

NAMESPACE = "vllm-live"
NAME = "tiny"
OWNER = Owner(name=NAME, namespace=NAMESPACE, uid="-")
APP = external_app_name(OWNER)
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


@dataclass
class Served:
    """The deployment once Ready: where it answers, and what watches it."""

    base_url: str  # the OpenAI base URL (ends in /v1)
    model: str
    ray: RayServe
    prometheus: PrometheusApi
    operator: OperatorProcess

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", timeout=120)


def manifest(model_dir: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "samples" / "tiny-vllm.yaml").read_text()
    )
    document["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    spec = document["spec"]
    spec["model"]["weights"]["uri"] = str(model_dir)
    spec["autoscaling"] = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 2,
        # Far below what the tiny model serves, so a few concurrent clients overload a replica.
        "targetTokensPerSecond": 10,
        # Long enough to see both replicas ready once the load (which starves the 2 cores
        # while two engines run) has stopped.
        "scaleDownDelaySeconds": 90,
        "coldStartSeconds": 60,
    }
    return document


def status(kubectl: Kubectl) -> dict[str, Any]:
    found = kubectl.get("l4d", NAME, NAMESPACE)
    return (found or {}).get("status") or {}


def condition(kubectl: Kubectl, kind: str) -> dict[str, Any]:
    return next((c for c in status(kubectl).get("conditions", []) if c["type"] == kind), {})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, written by the command users run."""
    directory = tmp_path_factory.mktemp("tiny-vllm") / "model"
    subprocess.run(
        [sys.executable, "-m", "llama4_serving.tiny", str(directory)], check=True, timeout=300
    )
    return directory


@pytest.fixture(scope="module")
def served(
    local_cluster: LocalCluster,
    kubectl: Kubectl,
    operator: OperatorProcess,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("vllm-live")
    # The session's operator (RayService mode) would act on this resource too: pause it.
    operator.stop()
    with ray_serve_cluster(state) as ray:
        wait_for(ray.metrics_discovery_file.exists, 60, f"{ray.metrics_discovery_file}")
        external = OperatorProcess(
            local_cluster.kubeconfig,
            state,
            extra_args=(
                f"--external-ray-dashboard={ray.dashboard}",
                "--ray-accelerator-resource=fake_gpu",
                "--autoscale-interval=2",
            ),
        )
        with prometheus(
            state,
            # The job name the chart's ServiceMonitor gives the operator, which the rules select.
            {"llama4-operator": (f"127.0.0.1:{external.metrics_port}", {})},
            discovery_files={"ray": ray.metrics_discovery_file},
        ) as prom:
            external.extra_args += (f"--prometheus-url={prom.url}",)
            external.start()
            try:
                kubectl.run("create", "namespace", NAMESPACE, check=False)
                kubectl.apply(manifest(model_dir), NAMESPACE)
                started = time.monotonic()
                wait_for(
                    lambda: condition(kubectl, "Ready").get("status") == "True",
                    900,  # vLLM builds its engine: minutes on a busy 2-core machine
                    f"{NAME} Ready (last status: {status(kubectl).get('conditions')})",
                )
                print(f"Ready {time.monotonic() - started:.0f} s after apply")
                yield Served(
                    base_url=f"{ray.serve_url}{external_route_prefix(OWNER)}/v1",
                    model=NAME,
                    ray=ray,
                    prometheus=prom,
                    operator=external,
                )
            finally:
                kubectl.run("delete", "l4d", NAME, "-n", NAMESPACE, "--wait=true", check=False)
                external.stop()
                print(external.log()[-4000:])
                operator.start()


def test_status_says_what_serves(served: Served, kubectl: Kubectl) -> None:
    current = status(kubectl)
    assert current["readyReplicas"] == 1
    # The operator names Serve's default port; the route is the deployment's.
    assert current["endpoint"].endswith(f"{external_route_prefix(OWNER)}/v1")
    placement = current["placement"]
    # One GPU per replica: no expert parallelism, so no balancer; the operator's plan is not
    # vLLM's to take.
    assert placement["expertBalancer"] == "none"
    assert served.ray.engine_replica_ids(APP), "no RUNNING LLMServer replica"
    deployments = served.ray.application(APP)["deployments"]
    assert set(deployments) == {"LLMServer:tiny", "Llama4Ingress"}


def test_models_and_health(served: Served) -> None:
    client = served.client()
    assert [m.id for m in client.models.list().data] == [served.model]
    assert client.models.retrieve(served.model).id == served.model
    health = httpx.get(f"{served.base_url.removesuffix('/v1')}/health", timeout=30)
    assert health.status_code == 200, health.text
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_with_several_choices_and_logprobs(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=6,
        n=2,
        logprobs=True,
        top_logprobs=2,
        temperature=1.0,
        seed=7,
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage is not None
    lengths = []
    for choice in reply.choices:
        assert choice.logprobs is not None
        assert choice.logprobs.content is not None
        tokens = len(choice.logprobs.content)
        # A sampled end-of-turn token may end a choice early; otherwise it runs to max_tokens.
        assert tokens == 6 if choice.finish_reason == "length" else 0 < tokens <= 6, choice
        assert all(len(token.top_logprobs) == 2 for token in choice.logprobs.content)
        lengths.append(tokens)
    assert reply.usage.completion_tokens == sum(lengths)


def test_completions_with_logprobs(served: Served) -> None:
    reply = served.client().completions.create(
        model=served.model,
        prompt="The quick brown fox",
        max_tokens=5,
        logprobs=2,
        extra_body={"ignore_eos": True},  # vLLM's own parameter: always 5 tokens
    )
    (choice,) = reply.choices
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert len(choice.logprobs.token_logprobs) == 5
    assert choice.logprobs.top_logprobs is not None
    # The two likeliest tokens, and the chosen one where it is not among them (random weights).
    assert all(2 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 5


def test_structured_output(served: Served) -> None:
    client = served.client()
    schema_reply = client.chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "Is it raining?"}],
        max_tokens=40,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
        },
    )
    content = schema_reply.choices[0].message.content or ""
    assert json.loads(content)["answer"] in {"yes", "no"}, content
    object_reply = client.chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=40,
        response_format={"type": "json_object"},
    )
    content = object_reply.choices[0].message.content or ""
    assert isinstance(json.loads(content), dict), content


def test_a_named_tool_is_called(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_tokens=40,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls = reply.choices[0].message.tool_calls or []
    assert len(calls) == 1, reply
    call = calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in {"Paris", "Oslo"}


def test_streaming_reports_usage(served: Served) -> None:
    stream = served.client().chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None, chunks[-1]
    assert usage.completion_tokens == 5
    assert usage.prompt_tokens > 0
    assert text, "no content was streamed"


# Recorded from the reference engine's per-expert counters: vLLM exports no expert load.
REFERENCE_ENGINE_ONLY = ("llama4_expert_routed_tokens", "llama4_expert_balance")
OPERATOR_SERIES = ("llama4_operator_", "llama4_autoscaler_")


def test_every_serving_rule_and_panel_has_data_from_vllm(served: Served) -> None:
    """The recording rules and dashboard panels read vLLM's own series (Ray's metrics agents,
    scraped by the real Prometheus here) as they read the reference engine's."""
    client = served.client()
    for _ in range(3):  # requests over a few scrapes, so rates and quantiles have data
        client.completions.create(model=served.model, prompt="Metrics for", max_tokens=4)
    recorded = [
        rule["record"]
        for rule in rules.recording_rules(Selectors())
        if not any(name in rule["record"] for name in REFERENCE_ENGINE_ONLY)
    ]
    assert rules.KV_CACHE_USAGE in recorded
    assert rules.REQUESTS_WAITING in recorded

    def queried_under_traffic(expr: str) -> list[dict[str, Any]]:
        # A request per look keeps vLLM's gauges fresh: an idle engine stops updating them,
        # and on a loaded machine a gauge reported once had gone again before its rule came up.
        client.completions.create(model=served.model, prompt="Metrics for", max_tokens=4)
        return served.prometheus.query(expr)

    for record in recorded:
        wait_for(
            lambda record=record: queried_under_traffic(f'{record}{{name="{NAME}"}}'),
            90,
            f"recording rule {record} from vLLM's series",
            interval_s=2.0,
        )
    # What a user picks in Grafana: All namespaces (external-Ray series have none), this one.
    variables = {"$namespace": ".*", "$deployment": NAME}
    for dashboard in dashboards.all_dashboards(Selectors()):
        for panel in dashboard.to_json()["panels"]:
            for target in panel["targets"]:
                expr: str = target["expr"]
                if any(name in expr for name in (*OPERATOR_SERIES, *REFERENCE_ENGINE_ONLY)):
                    continue
                for variable, value in variables.items():
                    expr = expr.replace(variable, value)
                wait_for(
                    lambda expr=expr: queried_under_traffic(expr),
                    60,
                    f"panel {panel['title']!r} from vLLM's series: {expr}",
                    interval_s=2.0,
                )


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"max_tokens": 5000}, "max_tokens"),  # beyond maxContextLength (1024)
        ({"max_tokens": 4, "temperature": -1}, "temperature"),
        ({"max_tokens": 4, "logprobs": True, "top_logprobs": 50}, "logprobs"),
    ],
)
def test_requests_it_cannot_serve_get_a_400_naming_the_field(
    served: Served, request_fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        served.client().chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": "Hi"}], **request_fields
        )
    assert named in str(raised.value)


class Load:
    """Concurrent chat requests until stopped; counts what was answered."""

    def __init__(self, served: Served, clients: int = 2) -> None:
        self.served = served
        self.stop_event = threading.Event()
        self.answered = 0
        self.failed: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        client = self.served.client()
        while not self.stop_event.is_set():
            try:
                client.chat.completions.create(
                    model=self.served.model,
                    messages=[{"role": "user", "content": "Mixture of experts route tokens"}],
                    max_tokens=24,
                )
                self.answered += 1
            except openai.OpenAIError as error:
                self.failed.append(f"{type(error).__name__}: {error}")
                self.stop_event.wait(0.5)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=150)


def spec_replicas(kubectl: Kubectl) -> int:
    return int(kubectl.run("get", "l4d", NAME, "-n", NAMESPACE, "-o=jsonpath={.spec.replicas}"))


def test_scales_on_vllm_tokens_and_keeps_the_first_replica(
    served: Served, kubectl: Kubectl
) -> None:
    (first,) = served.ray.engine_replica_ids(APP)
    seen: list[list[str]] = []

    def replicas_now() -> list[str]:
        ids = served.ray.engine_replica_ids(APP)
        seen.append(ids)
        return ids

    with Load(served) as load:
        wait_for(lambda: spec_replicas(kubectl) == 2, 240, "spec.replicas to go 1 -> 2")
        wait_for(lambda: len(replicas_now()) == 2, 600, "2 RUNNING vLLM engine replicas")
        # The autoscaler read vLLM's own counters, through Prometheus, for this deployment.
        rate = wait_for(
            lambda: served.prometheus.query(f'{GENERATED_TOKENS_RATE}{{name="{NAME}"}} > 0'),
            90,
            f"{GENERATED_TOKENS_RATE} for {NAME} from vLLM's series",
        )
        assert rate
    wait_for(
        lambda: (
            condition(kubectl, "Ready").get("status") == "True"
            and status(kubectl).get("readyReplicas") == 2
        ),
        80,
        "readyReplicas 2",
    )
    assert load.answered > 0
    assert not load.failed, load.failed[:5]

    wait_for(lambda: spec_replicas(kubectl) == 1, 240, "spec.replicas back 2 -> 1")
    wait_for(lambda: len(replicas_now()) == 1, 240, "1 vLLM engine replica again")
    # The replica that served first served throughout: scaling never restarted it.
    assert all(first in ids for ids in seen if ids), seen
    assert served.ray.engine_replica_ids(APP) == [first]
    autoscaling = status(kubectl)["autoscaling"]
    assert autoscaling["metricsSource"] == f"prometheus {served.prometheus.url}"
    reasons = [
        e["reason"]
        for e in json.loads(
            kubectl.run(
                "get",
                "events",
                "-n",
                NAMESPACE,
                f"--field-selector=involvedObject.name={NAME}",
                "-o=json",
            )
        )["items"]
    ]
    assert "ScaledUp" in reasons, reasons
    assert "ScaledDown" in reasons, reasons


@pytest.fixture(scope="module")
def vision_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-vision") / "model"
    subprocess.run(
        [sys.executable, "-m", "llama4_serving.tiny", "--multimodal", str(directory)],
        check=True,
        timeout=300,
    )
    return directory


def png_data_url(width: int, height: int) -> str:
    image = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(image, format="PNG")
    return "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()


def test_image_parts_are_served(served: Served, kubectl: Kubectl, vision_model_dir: Path) -> None:
    name = "vision"
    document = manifest(vision_model_dir)
    document["metadata"]["name"] = name
    del document["spec"]["autoscaling"]
    document["spec"]["engine"]["extraArgs"] = {"limit_mm_per_prompt": '{"image": 1}'}
    kubectl.apply(document, NAMESPACE)
    try:
        wait_for(
            lambda: any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (kubectl.get("l4d", name, NAMESPACE) or {})
                .get("status", {})
                .get("conditions", [])
            ),
            900,
            f"{name} Ready",
        )
        base = served.base_url.replace(f"/{NAME}/v1", f"/{name}/v1")
        client = openai.OpenAI(base_url=base, api_key="unused", timeout=120)
        question = {"type": "text", "text": "What is in the picture?"}
        text_only = client.chat.completions.create(
            model=name, max_tokens=4, messages=[{"role": "user", "content": [question]}]
        )
        # 100 x 60 pixels: tiles of 56 pixels plus a global view, 4 patch tokens each after
        # the pixel shuffle, between image-start/end and tile-separator tokens.
        with_image = client.chat.completions.create(
            model=name,
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        question,
                        {"type": "image_url", "image_url": {"url": png_data_url(100, 60)}},
                    ],
                }
            ],
        )
        assert text_only.usage is not None
        assert with_image.usage is not None
        assert with_image.usage.completion_tokens > 0
        # The image went through the processor into the prompt as image tokens.
        assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens + 16
    finally:
        kubectl.run("delete", "l4d", name, "-n", NAMESPACE, "--wait=true", check=False)


@pytest.mark.parametrize(
    ("name", "change", "said"),
    [
        (
            "bad-arg",
            {"engine": {"name": "vllm", "extraArgs": {"no_such_vllm_argument": "1"}}},
            "takes no engine argument named no_such_vllm_argument",
        ),
        (
            "no-weights",
            {"weights": {"source": "path", "uri": "/nonexistent/tiny"}},
            "/nonexistent/tiny holds no checkpoint",
        ),
        ("too-long", {"maxContextLength": 8192}, "8192 tokens is longer than the checkpoint"),
    ],
)
def test_what_vllm_refuses_is_said_in_conditions_and_events(
    served: Served, kubectl: Kubectl, model_dir: Path, name: str, change: dict[str, Any], said: str
) -> None:
    document = manifest(model_dir)
    document["metadata"]["name"] = name
    del document["spec"]["autoscaling"]
    for key, value in change.items():
        target = document["spec"] if key == "engine" else document["spec"]["model"]
        target[key] = value
    kubectl.apply(document, NAMESPACE)
    try:
        message = wait_for(
            lambda: next(
                (
                    c["message"]
                    for c in (kubectl.get("l4d", name, NAMESPACE) or {})
                    .get("status", {})
                    .get("conditions", [])
                    if c["type"] == "Ready" and said in c.get("message", "")
                ),
                None,
            ),
            300,
            f"{name}: a Ready condition saying {said!r}",
        )
        assert "DEPLOY_FAILED" in message, message
        events = kubectl.run(
            "get", "events", "-n", NAMESPACE, f"--field-selector=involvedObject.name={name}"
        )
        assert said in events, events
        # The deployment that serves is not disturbed by its broken neighbour.
        assert condition(kubectl, "Ready").get("status") == "True"
    finally:
        kubectl.run("delete", "l4d", name, "-n", NAMESPACE, "--wait=true", check=False)
