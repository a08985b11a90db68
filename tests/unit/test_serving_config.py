"""Validation of the serving contract, of requests, and `build_app`'s checks."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from ray.serve.schema import DeploymentSchema

from llama4_serving.app import build_app
from llama4_serving.config import (
    ExpertPlacement,
    RuntimeKnobs,
    ServingConfig,
    llm_server_overrides,
    rendered_replicas,
)
from llama4_serving.openai_protocol import ChatCompletionRequest, CompletionRequest
from llama4_serving.tiny import tiny_architecture


def _args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "served_model_name": "tiny",
        "architecture": tiny_architecture().model_dump(),
    }
    args.update(overrides)
    return args


def _plan(
    phy2log: list[list[int]], nodes: int = 2, gpus: int = 2, slots: int = 1
) -> dict[str, Any]:
    return {"nodes": nodes, "gpus_per_node": gpus, "slots_per_gpu": slots, "phy2log": phy2log}


def test_placement_needs_one_row_per_moe_layer() -> None:
    with pytest.raises(ValidationError, match="one row per MoE layer"):
        ServingConfig.model_validate(_args(placement=_plan([[0, 1, 2, 3]])))


def test_placement_must_hold_every_expert() -> None:
    with pytest.raises(ValidationError, match=r"phy2log\[1\] holds no copy of experts \[3\]"):
        ServingConfig.model_validate(_args(placement=_plan([[0, 1, 2, 3], [0, 1, 2, 2]])))


def test_placement_rejects_unknown_expert_ids() -> None:
    with pytest.raises(ValidationError, match=r"valid ids are 0..3"):
        ServingConfig.model_validate(_args(placement=_plan([[0, 1, 2, 3], [0, 1, 2, 9]])))


def test_metrics_target_labels_must_be_prometheus_label_names() -> None:
    config = ServingConfig.model_validate(_args(metrics_target_labels={"namespace": "llm"}))
    assert config.metrics_target_labels == {"namespace": "llm"}
    with pytest.raises(ValidationError, match=r"\['__meta', 'name-space'\] are not Prometheus"):
        ServingConfig.model_validate(
            _args(metrics_target_labels={"name-space": "x", "__meta": "y", "ok": "z"})
        )


def test_build_app_rejects_what_an_engine_cannot_serve() -> None:
    with pytest.raises(ValueError, match="weights: the vllm engine loads a checkpoint"):
        build_app(_args(engine="vllm"))  # random weights
    with pytest.raises(ValueError, match="quantization 'fp8'"):
        build_app(_args(quantization="fp8"))
    with pytest.raises(ValidationError, match="served_model_name"):
        build_app(_args(served_model_name=""))


def test_build_app_passes_runtime_knobs_as_user_config() -> None:
    plan = _plan([[0, 1, 2, 3], [3, 2, 1, 0]])
    app = build_app(_args(placement=plan))
    ingress = app._bound_deployment  # the bound graph Serve will deploy
    server = ingress.init_args[0]._bound_deployment
    knobs = RuntimeKnobs.model_validate(server.user_config)
    assert knobs.placement == ExpertPlacement.model_validate(plan)
    assert server.max_ongoing_requests == 2 * knobs.batching.max_num_seqs  # type: ignore[union-attr]


def test_runtime_knobs_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="batchng"):
        RuntimeKnobs.model_validate({"batchng": {}})


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        ({"model": "m", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_completion_requests_name_the_bad_field(request_body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        CompletionRequest.model_validate(request_body)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs, top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_the_reference_engine_refuses_what_it_does_not_serve(
    fields: dict[str, Any], named: str
) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError, match=f"{named}: not served by the reference engine"):
        ChatCompletionRequest.model_validate({**chat, **fields})
    # Their "ask for nothing" values, and fields it has no use for, still pass.
    ChatCompletionRequest.model_validate(
        {**chat, "logprobs": False, "tools": [], "response_format": {"type": "text"}, "user": "u"}
    )


def test_chat_schema_accepts_image_parts() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    ],
                }
            ],
        }
    )
    assert request.messages[0].has_image()
    assert request.messages[0].text() == "what is this?"


def test_zero_replicas_are_serve_autoscaling_from_zero_to_one() -> None:
    # Serve refuses num_replicas 0; a deployment scaled to zero keeps its engine deployment, at
    # zero replicas, and Serve's router holds requests until one runs.
    asleep = llm_server_overrides(ServingConfig.model_validate(_args(num_replicas=0)))
    assert "num_replicas" not in asleep
    schema = DeploymentSchema.model_validate(asleep)
    scaling = schema.autoscaling_config
    assert isinstance(scaling, dict)
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (
        0,
        0,
        1,
    )
    with pytest.raises(ValidationError, match="num_replicas"):
        DeploymentSchema.model_validate({**asleep, "num_replicas": 0})
    awake = llm_server_overrides(ServingConfig.model_validate(_args(num_replicas=2)))
    assert "num_replicas" not in awake
    assert awake["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 2,
    }
    assert (rendered_replicas(asleep), rendered_replicas(awake)) == (0, 2)
