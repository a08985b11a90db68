"""The vllm engine's configuration: what the operator renders for `engine: vllm` is what Ray
Serve LLM's `LLMConfig` and vLLM's engine arguments accept, for the samples too."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import ray
import yaml
from ray.serve.llm import LLMConfig
from vllm.config import EPLBConfig, StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import FrontendArgs

from llama4_operator.api.models import Llama4DeploymentSpec
from llama4_operator.planners.cluster_placement import GpuNode
from llama4_operator.renderers.children import Owner, RayPodSettings
from llama4_operator.renderers.deployment import Previous, desired_state
from llama4_operator.renderers.serving import expert_balancer
from llama4_serving.app import build_app
from llama4_serving.config import (
    ExpertPlacement,
    ServingConfig,
    WeightsSource,
    application_args,
    engine_deployment_name,
    llm_server_overrides,
)
from llama4_serving.engines.vllm.llm_config import VLLMConfigError, llm_config
from llama4_serving.tiny import engine_tiny_architecture

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = RayPodSettings(image="llama4-serving:test", ray_version="2.60.0")


def _nodes(product: str, count: int, gpus: int = 8) -> list[GpuNode]:
    return [
        GpuNode(
            name=f"gpu-{i}",
            gpu_product=product,
            gpu_memory_mib=81559,
            allocatable_gpus=gpus,
            zone="zone-a",
            node_pool="pool-0",
            nvlink_domain=f"gpu-{i}",
        )
        for i in range(count)
    ]


def _sample(name: str) -> Llama4DeploymentSpec:
    body = yaml.safe_load((ROOT / "manifests" / "samples" / f"{name}.yaml").read_text())
    return Llama4DeploymentSpec.model_validate(body["spec"])


def _rendered(name: str, accelerator: str = "GPU") -> tuple[Any, ServingConfig]:
    spec = _sample(name)
    state = desired_state(
        Owner(name=name, namespace="llm", uid="uid"),
        spec,
        _nodes("NVIDIA-H100-80GB-HBM3", 4),
        SETTINGS,
        Previous(),
        service_monitor_available=False,
    )
    assert state.serving is not None, state.fit.message
    config = state.serving.model_copy(update={"accelerator_resource": accelerator})
    return state, config


def _engine_args(config: ServingConfig) -> AsyncEngineArgs:
    """vLLM's own argument types over the rendered kwargs, split as Ray Serve LLM splits them
    (the OpenAI server's `FrontendArgs`, the rest `AsyncEngineArgs`; unknown names raise). The
    model is a local stand-in: offline, vLLM would look a repository id up in the HF cache."""
    kwargs = dict(llm_config(config)["engine_kwargs"])
    frontend_names = {f.name for f in dataclasses.fields(FrontendArgs)}
    FrontendArgs(**{k: kwargs.pop(k) for k in list(kwargs) if k in frontend_names})
    if "eplb_config" in kwargs:
        kwargs["eplb_config"] = EPLBConfig(**kwargs["eplb_config"])
    if "structured_outputs_config" in kwargs:
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(
            **kwargs["structured_outputs_config"]
        )
    return AsyncEngineArgs(model=str(ROOT), **kwargs)


@pytest.mark.parametrize("name", ["scout", "maverick", "tiny-vllm"])
def test_samples_render_configs_ray_and_vllm_accept(name: str) -> None:
    _, config = _rendered(name, "fake_gpu" if name == "tiny-vllm" else "GPU")
    assert config.engine == "vllm"
    rendered = llm_config(config)
    llm = LLMConfig.model_validate(rendered)  # Ray Serve LLM's own model
    assert llm.model_id == config.served_model_name
    args = _engine_args(config)
    assert args.max_model_len == config.batching.max_model_len
    assert args.max_num_seqs == config.batching.max_num_seqs


def test_maverick_renders_expert_parallelism_with_vllm_eplb() -> None:
    state, config = _rendered("maverick")
    args = _engine_args(config)
    assert args.tensor_parallel_size == 8
    assert args.enable_expert_parallel is True
    assert args.enable_eplb is True
    # 128 experts + 16 redundant slots over 8 GPUs: 18 slots each, 16 redundant.
    assert args.eplb_config.num_redundant_experts == 16
    assert config.placement is None  # vLLM takes no external plan
    assert expert_balancer(_sample("maverick"), config.engine_args) == "vllm-eplb"
    assert state.experts is not None  # the operator's own plan stays for status


def test_tiny_cpu_sample_runs_on_cpu_bundles() -> None:
    _, config = _rendered("tiny-vllm", "fake_gpu")
    rendered = llm_config(config)
    assert rendered["placement_group_config"] == {"bundles": [{"CPU": 1.0, "fake_gpu": 1.0}]}
    assert rendered["engine_kwargs"]["enforce_eager"] is True
    assert rendered["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert rendered["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert _engine_args(config).structured_outputs_config.disable_any_whitespace is True
    assert expert_balancer(_sample("tiny-vllm"), config.engine_args) == "none"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """Ray Serve LLM reads the driver's runtime env while it builds the app, which starts Ray.
    Left to itself Ray would join the cluster last named in /tmp/ray/ray_current_cluster
    (perhaps dead, or another test's): this module gets a Ray of its own."""
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _checkpoint(directory: Path, max_position_embeddings: int = 4096) -> Path:
    """The part of a checkpoint the build checks: its config.json."""
    (directory / "config.json").write_text(
        json.dumps({"max_position_embeddings": max_position_embeddings})
    )
    return directory


@pytest.mark.usefixtures("local_ray")
def test_overrides_name_the_deployment_ray_serve_llm_builds(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    config = ServingConfig(
        served_model_name="org/tiny.v1",
        architecture=engine_tiny_architecture(),
        weights=WeightsSource(kind="path", uri=str(tmp_path)),
        engine="vllm",
        num_replicas=3,
        accelerator_resource="fake_gpu",
    )
    app = build_app(application_args(config))
    ingress = app._bound_deployment
    # Ray annotates init_kwargs as a tuple; it is the keyword arguments, a dict.
    init_kwargs = cast(dict[str, Any], ingress.init_kwargs)
    servers = list(init_kwargs["llm_deployments"].values())
    (server,) = [s._bound_deployment for s in servers]
    assert server.name == engine_deployment_name(config) == "LLMServer:org--tiny_v1"
    overrides = llm_server_overrides(config)
    assert overrides == {
        "name": server.name,
        "autoscaling_config": {"min_replicas": 3, "initial_replicas": 3, "max_replicas": 3},
        "max_ongoing_requests": 64,
    }
    assert "user_config" not in overrides  # vLLM's LLMServer has no reconfigure


def test_replica_changes_leave_args_alone_but_batching_restarts_vllm(tmp_path: Path) -> None:
    base = ServingConfig(
        served_model_name="tiny",
        architecture=engine_tiny_architecture(),
        weights=WeightsSource(kind="path", uri=str(tmp_path)),
        engine="vllm",
    )
    scaled = base.model_copy(update={"num_replicas": 4})
    assert application_args(scaled) == application_args(base)
    rebatched = base.model_copy(
        update={"batching": base.batching.model_copy(update={"max_num_seqs": 7})}
    )
    assert application_args(rebatched) != application_args(base)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"engine_args": {"no_such_argument": 1}},
            "engine.extraArgs: vLLM .* takes no engine argument named no_such_argument",
        ),
        (
            {"weights": {"kind": "path", "uri": "/nonexistent/model"}},
            r"model.weights.uri: /nonexistent/model holds no checkpoint",
        ),
        (
            {"batching": {"max_model_len": 8192}},
            r"model.maxContextLength: 8192 tokens is longer than .* allows "
            r"\(max_position_embeddings 4096\)",
        ),
    ],
)
@pytest.mark.usefixtures("local_ray")
def test_the_build_refuses_what_vllm_would_refuse_per_replica(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    args = {
        "served_model_name": "tiny",
        "architecture": engine_tiny_architecture().model_dump(),
        "weights": {"kind": "path", "uri": str(_checkpoint(tmp_path))},
        "engine": "vllm",
        "accelerator_resource": "fake_gpu",
    }
    build_app(args)  # the unchanged config builds
    with pytest.raises(ValueError, match=message):
        build_app({**args, **change})


def test_vllm_refuses_random_weights_and_external_plans(tmp_path: Path) -> None:
    random = ServingConfig(
        served_model_name="tiny", architecture=engine_tiny_architecture(), engine="vllm"
    )
    with pytest.raises(VLLMConfigError, match=r"spec\.model\.weights\.source"):
        llm_config(random)
    planned = ServingConfig(
        served_model_name="tiny",
        architecture=engine_tiny_architecture(),
        weights=WeightsSource(kind="path", uri=str(tmp_path)),
        engine="vllm",
        placement=ExpertPlacement(
            slots_per_gpu=8,
            phy2log=[list(range(8))] * len(engine_tiny_architecture().moe_layers),
        ),
    )
    with pytest.raises(VLLMConfigError, match="vLLM takes no external expert placement"):
        llm_config(planned)


def test_the_vllm_ingress_asks_v1_callers_for_the_api_key(tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llama4_serving.engines.vllm.app import api_key_check

    key_file = tmp_path / "key"
    key_file.write_text("sesame\n")
    app = FastAPI()
    app.middleware("http")(api_key_check(str(key_file)))
    app.get("/v1/models")(lambda: {"data": []})
    app.get("/health")(lambda: {"status": "ok"})
    client = TestClient(app)
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key
    key_file.write_text("rotated")
    assert client.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 401
    # On a shared Ray cluster the application sits under a route prefix, which Serve passes as
    # the ASGI root_path while the path keeps it.
    prefixed = TestClient(app, root_path="/llm/chat")
    assert prefixed.get("/llm/chat/v1/models").status_code == 401
    rotated = {"Authorization": "Bearer rotated"}
    assert prefixed.get("/llm/chat/v1/models", headers=rotated).status_code == 200
