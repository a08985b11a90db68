"""The reference engine's Serve app in process, no Ray cluster: the ingress' FastAPI routes (run by
a `TestClient`) call a real `LLMServer` (a tiny random model) through a stand-in for the
deployment handle that copies every argument and result the way Ray would."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray import cloudpickle, serve

from llama4_serving import metrics_targets
from llama4_serving.app import OpenAIIngress, api
from llama4_serving.config import BatchingLimits, ServingConfig, WeightsSource
from llama4_serving.engines.reference.engine import RequestOutput, RequestRejectedError
from llama4_serving.engines.reference.sampling import SamplingParams
from llama4_serving.llm_server import EngineEvent, LLMServer, Refusal, sampling_params
from llama4_serving.openai_protocol import ChatCompletionRequest, CompletionRequest
from llama4_serving.tiny import write_tiny_model

MODEL = "tiny"
KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 64
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello, world!"}]}
COMPLETION = {"model": MODEL, "prompt": "The quick brown fox"}
IMAGE_MESSAGE = {
    "role": "user",
    "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
    ],
}


def _copied(value: Any) -> Any:
    """What the other side of a deployment handle receives: a serialised copy."""
    return cloudpickle.loads(cloudpickle.dumps(value))


class _Stream:
    """What `handle.options(stream=True).<method>.remote(...)` returns: the replica's items."""

    def __init__(self, items: AsyncIterator[Any], fail_after: int | None) -> None:
        self._items = items
        self._left = fail_after

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        if self._left is not None:
            if self._left == 0:
                raise RuntimeError("the replica died")
            self._left -= 1
        return _copied(await anext(self._items))

    def cancel(self) -> None:
        pass


class _Handle:
    """A deployment handle to an in-process `LLMServer`; with `fail_after`, each stream breaks
    after that many items, as when the replica dies."""

    def __init__(self, server: Any, fail_after: int | None = None) -> None:
        self._server = server
        self.fail_after = fail_after

    def options(self, *, stream: bool) -> _Handle:
        assert stream
        return self

    def __getattr__(self, method: str) -> SimpleNamespace:
        def remote(*args: Any) -> _Stream:
            items = getattr(self._server, method)(*_copied(args))
            return _Stream(items, self.fail_after)

        return SimpleNamespace(remote=remote)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ServingConfig:
    directory = tmp_path_factory.mktemp("tiny")
    key_file = directory / "api-key"
    key_file.write_text(f"{KEY}\n")
    return ServingConfig(
        served_model_name=MODEL,
        architecture=write_tiny_model(directory),
        weights=WeightsSource(kind="path", uri=str(directory)),
        batching=BatchingLimits(
            max_num_seqs=4, max_num_batched_tokens=16, max_model_len=MAX_MODEL_LEN
        ),
        metrics_port=None,
        api_key_file=str(key_file),
        metrics_target_labels={"namespace": "llm"},
    )


@pytest.fixture(scope="module")
def server(config: ServingConfig) -> Iterator[Any]:
    replica = LLMServer.func_or_class(config.model_dump(mode="json"))  # type: ignore[attr-defined]
    yield replica
    replica.engine.shutdown()


@pytest.fixture
def handle(server: Any) -> _Handle:
    return _Handle(server)


@pytest.fixture
def client(config: ServingConfig, handle: _Handle, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    # `serve.ingress` wraps the class; its own constructor is the first base's.
    ingress_class = OpenAIIngress.func_or_class.__bases__[0]  # type: ignore[attr-defined]
    ingress = ingress_class(handle, config.model_dump(mode="json"))
    # The routes find their deployment instance, and the app name, in the replica context.
    context = SimpleNamespace(servable_object=ingress, app_name="llama4")
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return TestClient(api)


# -- the engine deployment's typed methods, called directly -------------------------------


def test_sampling_params_take_the_openai_defaults_from_the_request_models() -> None:
    completion = CompletionRequest.model_validate(COMPLETION)
    assert sampling_params(completion, MAX_MODEL_LEN) == SamplingParams(
        max_tokens=16, temperature=1.0, top_p=1.0, seed=None, stop=()
    )
    chat = ChatCompletionRequest.model_validate(CHAT)
    assert sampling_params(chat, MAX_MODEL_LEN).max_tokens is None  # up to the context
    asked = ChatCompletionRequest.model_validate(
        {**CHAT, "max_tokens": 9, "max_completion_tokens": 2, "stop": "\n", "seed": 4}
    )
    assert sampling_params(asked, MAX_MODEL_LEN) == SamplingParams(
        max_tokens=2, temperature=1.0, top_p=1.0, seed=4, stop=("\n",)
    )
    unbounded = CompletionRequest.model_validate({**COMPLETION, "max_tokens": None})
    assert sampling_params(unbounded, MAX_MODEL_LEN).max_tokens is None
    too_many = CompletionRequest.model_validate({**COMPLETION, "max_tokens": MAX_MODEL_LEN})
    with pytest.raises(RequestRejectedError, match=r"max_tokens 64 can never .* at most 63"):
        sampling_params(too_many, MAX_MODEL_LEN)


def _collect(events: AsyncIterator[EngineEvent]) -> list[EngineEvent]:
    async def collect() -> list[EngineEvent]:
        return [event async for event in events]

    return asyncio.run(collect())


def _outputs(events: AsyncIterator[EngineEvent]) -> list[RequestOutput]:
    """The events of a request the engine took: outputs only, the last one finished."""
    collected = _collect(events)
    outputs = [e for e in collected if isinstance(e, RequestOutput)]
    assert outputs == collected
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    return outputs


def test_completions_stream_the_engine_outputs(server: Any) -> None:
    text = CompletionRequest.model_validate({**COMPLETION, "max_tokens": 5, "temperature": 0})
    outputs = _outputs(server.completions(text))
    assert 1 <= outputs[-1].completion_tokens <= 5
    # The same prompt as token ids gives the same tokens.
    ids = server.tokenizer.encode(COMPLETION["prompt"])
    as_ids = text.model_copy(update={"prompt": ids})
    again = _outputs(server.completions(as_ids))
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]


def test_chat_streams_the_outputs_of_the_templated_prompt(server: Any) -> None:
    chat = ChatCompletionRequest.model_validate({**CHAT, "max_completion_tokens": 3})
    outputs = _outputs(server.chat(chat))
    assert outputs[-1].completion_tokens <= 3
    templated = server.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello, world!"}], add_generation_prompt=True, tokenize=False
    )
    expected = len(server.tokenizer.encode(templated, add_special_tokens=False))
    assert outputs[-1].prompt_tokens == expected


@pytest.mark.parametrize(
    ("method", "request_model", "message"),
    [
        (
            "chat",
            ChatCompletionRequest.model_validate({"model": MODEL, "messages": [IMAGE_MESSAGE]}),
            "takes text only",
        ),
        (
            "chat",
            ChatCompletionRequest.model_validate({**CHAT, "max_completion_tokens": 64}),
            "ask for at most 63",
        ),
        (
            "completions",
            CompletionRequest.model_validate({"model": MODEL, "prompt": [1, 2, 99999]}),
            "token ids must lie in",
        ),
        (
            "completions",
            CompletionRequest.model_validate({"model": MODEL, "prompt": [5] * 100}),
            "takes at most 63",
        ),
    ],
)
def test_what_the_engine_cannot_serve_is_one_refusal(
    server: Any,
    method: str,
    request_model: ChatCompletionRequest | CompletionRequest,
    message: str,
) -> None:
    (refusal,) = _collect(getattr(server, method)(request_model))
    assert isinstance(refusal, Refusal)
    assert refusal.status == 400
    assert message in refusal.message


# -- the ingress' routes, over the engine deployment ------------------------------------


def _post(client: TestClient, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, json=body, headers=AUTH)


def _events(client: TestClient, path: str, body: dict[str, Any]) -> list[Any]:
    """The SSE payloads of a streamed answer; the last is the literal `[DONE]`."""
    response = _post(client, path, {**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    payloads = [line.removeprefix("data: ") for line in lines]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_completion_answers_in_openai_shape(client: TestClient) -> None:
    response = _post(client, "/v1/completions", {**COMPLETION, "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"].startswith("cmpl-")
    assert answer["object"] == "text_completion"
    assert answer["model"] == MODEL
    (choice,) = answer["choices"]
    assert set(choice) == {"index", "finish_reason", "logprobs", "text"}
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] in {"stop", "length"}
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 5


def test_chat_answers_in_openai_shape(client: TestClient) -> None:
    response = _post(client, "/v1/chat/completions", {**CHAT, "max_tokens": 5})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"].startswith("chatcmpl-")
    assert answer["object"] == "chat.completion"
    (choice,) = answer["choices"]
    assert set(choice) == {"index", "finish_reason", "logprobs", "message"}
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    # The chat template wraps the message: more prompt tokens than its text alone.
    assert answer["usage"]["prompt_tokens"] > 4


def test_token_limits_and_their_defaults(client: TestClient) -> None:
    def completion_tokens(path: str, body: dict[str, Any]) -> tuple[int, str]:
        answer = _post(client, path, {**body, "temperature": 0}).json()
        return answer["usage"]["completion_tokens"], answer["choices"][0]["finish_reason"]

    # Completions default to 16 tokens, as OpenAI's do; chat runs to the context.
    tokens, finish = completion_tokens("/v1/completions", COMPLETION)
    assert tokens <= 16
    assert finish == "stop" or tokens == 16
    # Chat's max_completion_tokens wins over max_tokens.
    tokens, finish = completion_tokens(
        "/v1/chat/completions", {**CHAT, "max_tokens": 9, "max_completion_tokens": 2}
    )
    assert tokens <= 2
    assert finish == "stop" or tokens == 2


def test_a_seed_repeats_the_sample(client: TestClient) -> None:
    def text(seed: int) -> str:
        body = {**COMPLETION, "max_tokens": 8, "temperature": 1.0, "seed": seed}
        return str(_post(client, "/v1/completions", body).json()["choices"][0]["text"])

    assert text(3) == text(3)


def test_streamed_completion_equals_the_whole_one(client: TestClient) -> None:
    body = {**COMPLETION, "max_tokens": 6, "temperature": 0}
    whole = _post(client, "/v1/completions", body).json()
    chunks = _events(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *texts, usage = chunks
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("cmpl-")
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all(
        set(c["choices"][0]) == {"index", "finish_reason", "text", "logprobs"} for c in texts
    )
    assert "".join(c["choices"][0]["text"] for c in texts) == whole["choices"][0]["text"]
    assert texts[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == []
    assert usage["usage"] == whole["usage"]


def test_streamed_chat_opens_with_the_role_and_equals_the_whole_answer(
    client: TestClient,
) -> None:
    body = {**CHAT, "max_tokens": 6, "temperature": 0}
    whole = _post(client, "/v1/chat/completions", body).json()
    opening, *deltas = _events(client, "/v1/chat/completions", body)  # no usage asked for
    assert opening["id"].startswith("chatcmpl-")
    assert opening["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert {c["object"] for c in [opening, *deltas]} == {"chat.completion.chunk"}
    assert all(c["choices"] for c in deltas)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in deltas)
    assert content == whole["choices"][0]["message"]["content"]
    assert deltas[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {**COMPLETION, "n": 2}, 400, "n"),
        ("/v1/completions", {**COMPLETION, "temperature": 9}, 400, "temperature"),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "'tiny'"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 99999]}, 400, "token ids"),
        ("/v1/completions", {"model": MODEL, "prompt": [5] * 100}, 400, "at most 63"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 64}, 400, "max_tokens 64 can never"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 64}, 400, "at most 63"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs: not served"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [IMAGE_MESSAGE]}, 400, "text only"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ],
)
def test_requests_the_engine_cannot_serve_get_a_4xx_naming_why(
    client: TestClient, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    response = _post(client, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["code"] == status
    assert error["type"] == "invalid_request_error"


def test_bodies_are_checked_before_they_are_parsed(client: TestClient) -> None:
    url = "/v1/completions"
    unauthorised = client.post(url, json=COMPLETION)
    assert unauthorised.status_code == 401
    assert unauthorised.json()["error"]["type"] == "authentication_error"
    wrong_type = client.post(
        url, content=b"prompt=x", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415
    assert "application/json" in wrong_type.json()["error"]["message"]
    huge = json.dumps({**COMPLETION, "prompt": "a" * 200_000})
    too_large = client.post(url, content=huge, headers={**AUTH, "Content-Type": "application/json"})
    assert too_large.status_code == 413
    assert "shorten the prompt" in too_large.json()["error"]["message"]
    broken = client.post(url, content=b'{"model": ', headers=AUTH)
    assert broken.status_code == 400
    assert "JSON" in broken.json()["error"]["message"]


def test_models_and_metrics_targets(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/v1/models").status_code == 401
    models = client.get("/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    groups = [{"targets": ["10.0.0.1:8090"], "labels": {"llama4_app": "llama4"}}]
    asked: list[tuple[str, dict[str, str]]] = []

    def discovery(app_name: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        asked.append((app_name, labels))
        return groups

    monkeypatch.setattr(metrics_targets, "service_discovery", discovery)
    assert client.get("/-/metrics/targets").json() == groups  # addresses only: no key asked
    assert asked == [("llama4", {"namespace": "llm"})]


def _failing_engine(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine ends every request with an error after one good step (a lost expert shard)."""

    async def generate(request_id: str, prompt: list[int], params: Any) -> AsyncIterator[Any]:
        yield RequestOutput(request_id, "a", (1,), len(prompt), 1)
        yield RequestOutput(request_id, "", (), len(prompt), 1, "error", "MoE layer 1 is gone")

    monkeypatch.setattr(server.engine, "generate", generate)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_engine_error_is_a_503_or_an_error_event(
    client: TestClient,
    server: Any,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _failing_engine(server, monkeypatch)
    body = COMPLETION if path == "/v1/completions" else CHAT
    response = _post(client, path, body)
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "MoE layer 1 is gone",
        "type": "server_error",
        "param": None,
        "code": 503,
    }
    events = _events(client, path, {**body, "stream_options": {"include_usage": True}})
    assert events[-2]["error"]["message"] == "MoE layer 1 is gone"
    # Usage still counts what was generated before the error.
    usage = events[-1]["usage"]
    assert (usage["completion_tokens"], usage["total_tokens"]) == (1, usage["prompt_tokens"] + 1)


def test_a_lost_replica_is_a_503_or_an_error_event(client: TestClient, handle: _Handle) -> None:
    handle.fail_after = 1  # the replica dies after its first item
    response = _post(client, "/v1/completions", {**COMPLETION, "max_tokens": 4})
    assert response.status_code == 503
    assert "the engine replica failed during the request" in response.json()["error"]["message"]
    events = _events(client, "/v1/chat/completions", {**CHAT, "max_tokens": 4})
    assert events[-1]["error"]["code"] == 503
    handle.fail_after = 0  # no answer at all
    response = _post(client, "/v1/completions", COMPLETION)
    assert response.status_code == 503
    assert "the engine is unavailable" in response.json()["error"]["message"]


def test_no_first_output_in_time_is_a_503(
    client: TestClient, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(request_id: str, prompt: list[int], params: Any) -> AsyncIterator[Any]:
        await asyncio.sleep(3600)
        yield None

    monkeypatch.setattr(server.engine, "generate", never)
    ingress: Any = serve.get_replica_context().servable_object
    hurried = ingress.config.model_copy(update={"first_output_timeout_s": 0.05})
    monkeypatch.setattr(ingress, "config", hurried)
    response = _post(client, "/v1/completions", COMPLETION)
    assert response.status_code == 503
    assert "no engine replica answered" in response.json()["error"]["message"]


def test_the_queue_counts_generation_requests_until_their_answer_starts(
    client: TestClient, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached_engine = threading.Event()

    async def never(request_id: str, prompt: list[int], params: Any) -> AsyncIterator[Any]:
        reached_engine.set()
        await asyncio.sleep(3600)
        yield None

    monkeypatch.setattr(server.engine, "generate", never)
    ingress: Any = serve.get_replica_context().servable_object
    monkeypatch.setattr(
        ingress, "config", ingress.config.model_copy(update={"first_output_timeout_s": 3.0})
    )

    # Serve pickles the app into the ingress replica, and mounts it at the application's route
    # prefix (the ASGI root_path; paths keep it): count and route must still meet there.
    prefix = "/llm/chat"
    replica_client = TestClient(cloudpickle.loads(cloudpickle.dumps(api)), root_path=prefix)

    def waiting() -> int:
        response = replica_client.get(f"{prefix}/-/queue")  # no API key: a count only
        assert response.status_code == 200
        return int(response.json()["waiting_requests"])

    assert waiting() == 0
    answers: list[int] = []
    caller = threading.Thread(
        target=lambda: answers.append(
            _post(replica_client, f"{prefix}/v1/completions", COMPLETION).status_code
        )
    )
    caller.start()
    assert reached_engine.wait(30), "the request never reached the engine"
    assert waiting() == 1  # held, unanswered
    caller.join()
    assert answers == [503]  # no replica answered within the timeout
    assert waiting() == 0
