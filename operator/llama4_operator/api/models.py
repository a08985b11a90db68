"""Spec and status of a `Llama4Deployment`, as pydantic models.

Field names are Kubernetes-style camelCase on the wire (aliases) and snake_case in Python.
Descriptions become `kubectl explain` text; defaults, enums and bounds become the CRD's; each
cross-field rule exists twice, as a CEL rule in `x-kubernetes-validations` (so the API server
rejects the object) and as a model validator (so the operator and unit tests reject it too).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "serving.llama4.dev"
VERSION = "v1alpha1"
KIND = "Llama4Deployment"
PLURAL = "llama4deployments"
# Label on every serving series naming its Llama4Deployment: series are keyed by the resource,
# not by the served model name, which users may set to anything (and share across resources).
DEPLOYMENT_SERIES_LABEL = "llama4_deployment"
SINGULAR = "llama4deployment"
SHORT_NAME = "l4d"
CATEGORIES = ("llama4", "ai")

Variant = Literal["scout", "maverick", "behemoth", "custom"]
Quantization = Literal["bf16", "fp8", "int4"]
EngineName = Literal["reference", "vllm"]
ExpertBalancer = Literal["operator", "vllm-eplb", "none"]
AutoscalingMode = Literal["apply", "advisory"]


def _cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def _rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
    )


# --------------------------------------------------------------------------- model


class CustomArchitecture(ApiModel):
    """A mixture-of-experts decoder architecture, named after Hugging Face's `Llama4TextConfig`.

    Covers Llama 4 (top-1 routing, shared expert, interleaved MoE layers, chunked attention) and
    other open MoE models such as Mixtral 8x22B (top-2, no shared expert, no chunked attention)
    and DeepSeek-V3 (top-8 in 8 expert groups, 3 leading dense layers, multi-head latent
    attention).
    """

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.numAttentionHeads % self.numKeyValueHeads == 0",
                "numAttentionHeads must be a multiple of numKeyValueHeads (GQA groups)",
                ".numKeyValueHeads",
            ),
            _cel(
                "self.numExpertsPerTok <= self.numLocalExperts",
                "numExpertsPerTok cannot exceed numLocalExperts",
                ".numExpertsPerTok",
            ),
            _cel(
                "self.firstKDenseLayers < self.numHiddenLayers",
                "firstKDenseLayers must leave at least one MoE layer",
                ".firstKDenseLayers",
            ),
            _cel(
                "self.numLocalExperts % self.numExpertGroups == 0",
                "numLocalExperts must be a multiple of numExpertGroups",
                ".numExpertGroups",
            ),
            _cel(
                "self.topKGroups <= self.numExpertGroups",
                "topKGroups cannot exceed numExpertGroups",
                ".topKGroups",
            ),
        )
    )

    num_hidden_layers: int = Field(ge=1, le=1024, description="Decoder layers.")
    hidden_size: int = Field(ge=1, le=131072, description="Width of the residual stream.")
    intermediate_size: int = Field(
        ge=1, le=1048576, description="FFN width of one routed (and one shared) expert."
    )
    intermediate_size_mlp: int | None = Field(
        default=None,
        ge=1,
        le=1048576,
        description="FFN width of the dense (non-MoE) layers; omitted: same as intermediateSize.",
    )
    num_attention_heads: int = Field(ge=1, le=4096, description="Query heads.")
    num_key_value_heads: int = Field(ge=1, le=4096, description="Key/value heads (GQA).")
    head_dim: int = Field(ge=1, le=4096, description="Dimension of one attention head.")
    vocab_size: int = Field(ge=1, le=10_000_000, description="Tokenizer vocabulary size.")
    num_local_experts: int = Field(ge=1, le=65536, description="Routed experts per MoE layer.")
    num_experts_per_tok: int = Field(
        default=1, ge=1, le=256, description="Routed experts each token goes to (top-k)."
    )
    num_shared_experts: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Experts every token goes through in each MoE layer (Llama 4: 1; Mixtral: 0).",
    )
    interleave_moe_layer_step: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Layer i is MoE when (i + 1) is a multiple of this (1: every layer).",
    )
    first_k_dense_layers: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="The first k layers are dense whatever the interleave (DeepSeek-V3: 3).",
    )
    num_expert_groups: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Groups the router first picks among (DeepSeek-V3: 8; 1: no grouping).",
    )
    top_k_groups: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Expert groups each token may use (DeepSeek-V3: 4).",
    )
    attention_chunk_size: int | None = Field(
        default=None,
        ge=1,
        le=1 << 24,
        description=(
            "Window of the chunked (local, RoPE) attention layers (Llama 4: 8192). Omitted: "
            "every layer attends over the whole context."
        ),
    )
    no_rope_layer_interval: int = Field(
        default=4,
        ge=1,
        le=1024,
        description=(
            "With chunked attention, layer i is global (no RoPE) when (i + 1) is a multiple "
            "of this (Llama 4 iRoPE: 4)."
        ),
    )
    kv_lora_rank: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description=(
            "Multi-head latent attention (DeepSeek-V3: 512): the KV cache holds this latent "
            "instead of per-head keys and values. Omitted: grouped-query attention."
        ),
    )
    qk_rope_head_dim: int = Field(
        default=64,
        ge=0,
        le=4096,
        description="With latent attention, the decoupled RoPE key width cached per token.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CustomArchitecture:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "architecture.numAttentionHeads must be a multiple of numKeyValueHeads"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError("architecture.numExpertsPerTok cannot exceed numLocalExperts")
        if self.first_k_dense_layers >= self.num_hidden_layers:
            raise ValueError("architecture.firstKDenseLayers must leave at least one MoE layer")
        if self.num_local_experts % self.num_expert_groups:
            raise ValueError("architecture.numLocalExperts must be a multiple of numExpertGroups")
        if self.top_k_groups > self.num_expert_groups:
            raise ValueError("architecture.topKGroups cannot exceed numExpertGroups")
        return self

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) is a mixture-of-experts layer."""
        return (
            layer >= self.first_k_dense_layers and (layer + 1) % self.interleave_moe_layer_step == 0
        )

    def is_global_attention_layer(self, layer: int) -> bool:
        """Whether layer `layer` attends over the whole context (its KV grows with it)."""
        if self.attention_chunk_size is None:
            return True
        return (layer + 1) % self.no_rope_layer_interval == 0

    @property
    def moe_layer_count(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def uses_only_llama4_features(self) -> bool:
        """Whether the project's reference engine (a Llama 4 implementation) can run it."""
        return (
            self.first_k_dense_layers == 0
            and self.num_expert_groups == 1
            and self.kv_lora_rank is None
            and self.num_shared_experts <= 1
        )


class WeightsSpec(ApiModel):
    """Where the engine reads weights and tokenizer from."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.source != 'path' || size(self.uri) > 0",
                "uri (a directory) is required when source is path",
                ".uri",
            )
        )
    )

    source: Literal["huggingface", "path", "random"] = Field(
        default="huggingface",
        description=(
            "huggingface: a repository id present in the serving pods' Hugging Face cache; "
            "path: a directory (e.g. a mounted volume); random: random weights (demos, tests)."
        ),
    )
    uri: str = Field(
        default="",
        max_length=1024,
        description=(
            "Hugging Face repository id or directory path. Omitted for a catalog model: its "
            "published repository."
        ),
    )
    tokenizer_path: str | None = Field(
        default=None, max_length=1024, description="Tokenizer directory; omitted: the weights'."
    )
    volume_claim_name: str | None = Field(
        default=None,
        max_length=253,
        description="PersistentVolumeClaim mounted read-only at /models in every Ray pod.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of random weights.")

    @model_validator(mode="after")
    def _path_needs_uri(self) -> WeightsSpec:
        if self.source == "path" and not self.uri:
            raise ValueError("model.weights.uri (a directory) is required when source is path")
        return self


class ModelSpec(ApiModel):
    """Which model to serve, from which weights, at which precision and context length."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.variant == 'custom' ? has(self.architecture) : !has(self.architecture)",
                "architecture is required when variant is custom, and must be omitted otherwise",
                ".architecture",
            ),
            _cel(
                "self.variant != 'custom' || self.weights.source == 'random' || "
                "size(self.weights.uri) > 0",
                "weights.uri is required for a custom model (or use weights.source: random)",
                ".weights.uri",
            ),
        )
    )

    variant: Variant = Field(
        description=(
            "scout (Llama 4 Scout 17B-16E), maverick (Llama 4 Maverick 17B-128E), behemoth "
            "(Llama 4 Behemoth, an estimate: Meta has not published its configuration), or "
            "custom (give architecture)."
        )
    )
    architecture: CustomArchitecture | None = Field(
        default=None, description="The architecture of a custom model (variant: custom only)."
    )
    weights: WeightsSpec = Field(
        default_factory=WeightsSpec, description="Where the weights come from."
    )
    quantization: Quantization = Field(
        default="bf16",
        description=(
            "Precision of the linear-layer weights: bf16 (2 bytes a parameter), fp8 (1), int4 "
            "(half a byte plus group scales). Embeddings and the KV cache stay bf16."
        ),
    )
    max_context_length: int = Field(
        default=8192,
        ge=128,
        le=16_777_216,
        description="Longest prompt plus output, in tokens; the KV cache is sized for it.",
    )
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Model name in /v1/models; omitted: the resource's name.",
    )

    @model_validator(mode="after")
    def _architecture_iff_custom(self) -> ModelSpec:
        if self.variant == "custom" and self.architecture is None:
            raise ValueError("model.architecture is required when model.variant is custom")
        if self.variant != "custom" and self.architecture is not None:
            raise ValueError(
                f"model.architecture must be omitted for model.variant {self.variant!r}; "
                "use variant custom to give your own"
            )
        if self.variant == "custom" and self.weights.source != "random" and not self.weights.uri:
            raise ValueError(
                "model.weights.uri is required for a custom model (or use weights.source: random)"
            )
        return self


# --------------------------------------------------------------------------- engine, resources


class EngineSpec(ApiModel):
    """The inference engine inside the Ray Serve application."""

    name: EngineName = Field(
        default="vllm",
        description=(
            "vllm: vLLM with expert parallelism, for production GPUs; reference: the project's "
            "own torch implementation of the Llama 4 architecture (small models, demos, tests)."
        ),
    )
    image: str | None = Field(
        default=None,
        max_length=1024,
        description="Container image of the Ray pods; omitted: the operator's default image.",
    )
    extra_args: dict[str, str] = Field(
        default_factory=dict,
        description='Extra engine arguments, e.g. {"enforce_eager": "true"} for vLLM.',
    )


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration), applied to every Ray pod."""

    key: str | None = Field(default=None, max_length=316, description="Taint key.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; omitted: all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


class ParallelismSpec(ApiModel):
    """How one replica's GPUs split the model."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.strategy == 'auto' || (has(self.tensor) && has(self.data))",
                "tensor and data are required when strategy is manual",
            ),
            _cel(
                "self.strategy == 'manual' || (!has(self.tensor) && !has(self.data))",
                "tensor and data are set only when strategy is manual",
            ),
        )
    )

    strategy: Literal["auto", "manual"] = Field(
        default="auto",
        description=(
            "auto: the fit check picks the smallest layout whose per-GPU memory fits (tensor "
            "parallel inside a node, pipeline parallel across nodes, experts spread over all "
            "GPUs). manual: use tensor, data and pipeline as given."
        ),
    )
    tensor: int | None = Field(default=None, ge=1, le=64, description="Tensor-parallel width.")
    data: int | None = Field(
        default=None, ge=1, le=1024, description="Data-parallel (attention) ranks."
    )
    pipeline: int = Field(default=1, ge=1, le=64, description="Pipeline stages (manual only).")
    expert_parallel: bool = Field(
        default=True,
        description=(
            "Spread routed experts across all tensor x data x pipeline GPUs (expert "
            "parallelism); false: each tensor-parallel group holds every expert."
        ),
    )

    @model_validator(mode="after")
    def _manual_needs_sizes(self) -> ParallelismSpec:
        if self.strategy == "manual" and (self.tensor is None or self.data is None):
            raise ValueError(
                "resources.parallelism.tensor and .data are required when strategy is manual"
            )
        if self.strategy == "auto" and (self.tensor is not None or self.data is not None):
            raise ValueError(
                "resources.parallelism.tensor and .data are set only with strategy: manual"
            )
        return self


class ResourcesSpec(ApiModel):
    """Which GPUs the model runs on and how it is split across them."""

    gpu_product: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "Value of the nodes' nvidia.com/gpu.product label (e.g. NVIDIA-H100-80GB-HBM3); "
            "omitted: the product on which the model fits with the fewest GPUs."
        ),
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "GPUs a worker uses on each node of a multi-node replica; omitted: the nodes' "
            "allocatable nvidia.com/gpu."
        ),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node labels every GPU worker node must have."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations of every Ray pod."
    )
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="How a replica's GPUs split the model."
    )


# --------------------------------------------------------------------------- scaling, placement


class AutoscalingSpec(ApiModel):
    """Scale replicas on token throughput."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.minReplicas <= self.maxReplicas",
                "minReplicas must not exceed maxReplicas",
                ".minReplicas",
            )
        )
    )

    enabled: bool = Field(
        default=False, description="Run the autoscaler (it sets spec.replicas in apply mode)."
    )
    mode: AutoscalingMode = Field(
        default="apply",
        description=(
            "apply: the autoscaler sets spec.replicas. advisory: it decides as it would and "
            "records the advice (status.autoscaling, events, the "
            "llama4_autoscaler_desired_replicas series) but leaves spec.replicas alone, so its "
            "advice can be compared with the replicas you run before it is trusted."
        ),
    )
    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description=(
            "Fewest replicas. 0 scales to zero after scaleDownDelaySeconds without traffic: "
            "the endpoint stays up, requests that arrive wait (up to coldStartSeconds + 90 s) "
            "while the autoscaler starts a replica, and are then answered."
        ),
    )
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas.")
    target_tokens_per_second: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Tokens per second (prompt plus generated) one replica serves within its latency "
            "goal: its capacity. The operator adds replicas when demand passes the "
            "replicas' total and sizes them to run at 95%; a lower rate measured while "
            "requests stay queued replaces it. Omitted: calibrated from the "
            "throughput replicas reach while a backlog keeps them busy, starting from a "
            "guess of 1000."
        ),
    )
    scale_down_delay_seconds: int = Field(
        default=600,
        ge=0,
        le=86400,
        description=(
            "Seconds the load must stay low before replicas are given back, and the least "
            "time after a scale-up before any scale-down."
        ),
    )
    cold_start_seconds: int = Field(
        default=300,
        ge=0,
        le=7200,
        description=(
            "Seconds a new replica takes to serve (weights loaded); scale-ups look this far "
            "ahead and count the backlog that builds meanwhile."
        ),
    )

    @property
    def scales_to_zero(self) -> bool:
        """Whether the autoscaler may take the deployment to zero replicas (and wake it)."""
        return self.enabled and self.min_replicas == 0

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling.minReplicas ({self.min_replicas}) must not exceed "
                f"autoscaling.maxReplicas ({self.max_replicas})"
            )
        return self


class RebalanceSpec(ApiModel):
    """When and how much the operator moves experts between GPUs on measured load."""

    enabled: bool = Field(default=True, description="Rebalance experts on measured load.")
    balance_threshold: float = Field(
        default=0.8,
        ge=0.01,
        le=1.0,
        description=(
            "Rebalance when the measured balance (mean GPU expert load over the busiest GPU's; "
            "1.0 is perfect) drops below this."
        ),
    )
    migration_budget: int = Field(
        default=8, ge=0, le=65536, description="Most expert copies moved in one rebalance."
    )
    interval_seconds: int = Field(
        default=600, ge=30, le=86400, description="Seconds between rebalance checks."
    )


class PlacementSpec(ApiModel):
    """Expert placement across the GPUs of a replica."""

    redundant_expert_slots: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Extra expert slots per MoE layer for copies of the busiest experts.",
    )
    balance_slack: float = Field(
        default=0.02,
        ge=0.0,
        le=0.2,
        description=(
            "Layer balance the expert planner may give up for fewer cross-node tokens and fewer "
            "expert copies moved; 0 asks for balance first."
        ),
    )
    rebalance: RebalanceSpec = Field(
        default_factory=RebalanceSpec, description="Rebalancing on measured expert load."
    )


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Secret name.")
    key: str = Field(default="api-key", min_length=1, max_length=253, description="Key.")


class BatchingSpec(ApiModel):
    """Continuous-batching limits of one replica (they size the activation headroom)."""

    max_num_seqs: int = Field(default=32, ge=1, le=4096, description="Sequences decoded together.")
    max_num_batched_tokens: int = Field(
        default=2048, ge=16, le=1_048_576, description="Prefill token budget per engine step."
    )


class ServingSpec(ApiModel):
    """The OpenAI-compatible endpoint."""

    port: int = Field(default=8000, ge=1, le=65535, description="Port of the endpoint Service.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding the API key clients must send; omitted: none."
    )
    batching: BatchingSpec = Field(
        default_factory=BatchingSpec, description="Continuous-batching limits."
    )
    request_timeout_seconds: float = Field(
        default=300,
        ge=1,
        le=86400,
        description=(
            "End-to-end limit of one request at the Serve proxy (RayService mode): past it the "
            "client gets a 408 instead of waiting, e.g. while a lost replica is replaced. "
            "Streams count too: set it above the longest generation you serve."
        ),
    )
    ray_authentication: Literal["token", "disabled"] = Field(
        default="token",
        description=(
            "Ray's token authentication on the RayService's Ray cluster: KubeRay generates a "
            "token Secret and sets RAY_AUTH_MODE and RAY_AUTH_TOKEN on every Ray container, so "
            "the dashboard (with its job-submission API) and the GCS refuse callers without "
            "it. disabled: no authentication (for Ray images older than 2.52)."
        ),
    )


class MonitoringSpec(ApiModel):
    """Prometheus integration."""

    service_monitor: bool = Field(
        default=False,
        description="Create a ServiceMonitor (needs the monitoring.coreos.com CRDs).",
    )
    scrape_interval: str = Field(
        default="30s",
        pattern=r"^[0-9]+(ms|s|m|h)$",
        description="Scrape interval of the ServiceMonitor, e.g. 30s.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the ServiceMonitor (for selection)."
    )


VLLM_NEEDS_CHECKPOINT = (
    "model.weights.source: random cannot be served by engine vllm, which loads a checkpoint; "
    "use source path or huggingface (`python -m llama4_serving.tiny DIR` writes a tiny one), "
    "or engine.name: reference"
)


class Llama4DeploymentSpec(ApiModel):
    """The desired state of a Llama 4 (or other mixture-of-experts) model served on GPUs."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.engine.name == 'vllm' || !has(self.model.architecture) || "
                "(self.model.architecture.firstKDenseLayers == 0 && "
                "self.model.architecture.numExpertGroups == 1 && "
                "!has(self.model.architecture.kvLoraRank) && "
                "self.model.architecture.numSharedExperts <= 1)",
                "the reference engine runs the Llama 4 architecture only; use engine.name: vllm "
                "for dense leading layers, expert groups, latent attention or several shared "
                "experts",
                ".engine.name",
            ),
            _cel(
                "self.engine.name != 'vllm' || self.model.weights.source != 'random'",
                VLLM_NEEDS_CHECKPOINT,
                ".model.weights.source",
            ),
        )
    )

    model: ModelSpec = Field(description="The model and its weights.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="The inference engine.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="GPUs, node selection and parallelism."
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Model replicas (each one full copy of the model); the /scale subresource.",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Scaling on token throughput."
    )
    placement: PlacementSpec = Field(
        default_factory=PlacementSpec, description="Expert placement and rebalancing."
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The endpoint.")
    monitoring: MonitoringSpec = Field(
        default_factory=MonitoringSpec, description="Prometheus integration."
    )

    @model_validator(mode="after")
    def _engine_supports_architecture(self) -> Llama4DeploymentSpec:
        arch = self.model.architecture
        if self.engine.name == "reference" and arch and not arch.uses_only_llama4_features:
            raise ValueError(
                "engine.name: reference runs the Llama 4 architecture only; use engine.name: "
                "vllm for dense leading layers, expert groups, latent attention or several "
                "shared experts"
            )
        if self.engine.name == "vllm" and self.model.weights.source == "random":
            raise ValueError(VLLM_NEEDS_CHECKPOINT)
        return self


# --------------------------------------------------------------------------- status


class Condition(ApiModel):
    """A condition, shaped like metav1.Condition."""

    type: str = Field(max_length=316, description="Ready, Progressing, Degraded or Fits.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason for the last transition.",
    )
    message: str = Field(default="", max_length=32768, description="Details for humans.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition is based on."
    )


class WorkerSummary(ApiModel):
    """GPUs one Ray worker uses on one node."""

    node: str = Field(description="Node name.")
    gpus: int = Field(ge=0, description="GPUs on that node.")


class ReplicaSummary(ApiModel):
    """Where one replica's GPU workers run."""

    index: int = Field(ge=0, description="Replica index.")
    workers: list[WorkerSummary] = Field(default_factory=list, description="Its workers.")


class RenderedPlacement(ApiModel):
    """The cluster and expert placement currently rendered: the reconciler's part of
    status.placement, which it alone writes."""

    gpu_product: str | None = Field(default=None, description="GPU product of the workers.")
    gpus_per_node: int = Field(default=0, ge=0, description="GPUs of each worker.")
    nodes_per_replica: int = Field(default=0, ge=0, description="Workers (nodes) per replica.")
    replicas: list[ReplicaSummary] = Field(default_factory=list, description="Placed replicas.")
    unplaced: int = Field(default=0, ge=0, description="Replicas without room in the cluster.")
    reason: str = Field(default="", description="Why some replicas could not be placed.")
    expert_plan_version: int = Field(default=0, ge=0, description="Expert placement version.")
    expert_balancer: ExpertBalancer = Field(
        default="none",
        description=(
            "Who keeps the experts balanced: operator (plans from measured load, applied live by "
            "the reference engine), vllm-eplb (vLLM's own balancer, with expert parallelism), "
            "or none."
        ),
    )
    expert_balance: float = Field(
        default=1.0,
        description="Mean GPU expert load over the busiest GPU's (uniform load); 1.0 is perfect.",
    )


class ExpertRebalancing(ApiModel):
    """The rebalance loop's part of status.placement, which it alone writes."""

    measured_balance: float | None = Field(
        default=None,
        description=(
            "Balance of expert plan measuredPlanVersion on the last window of measured routed "
            "tokens (after a rebalance: what the new plan reaches on that window); unset until "
            "measured."
        ),
    )
    measured_plan_version: int | None = Field(
        default=None,
        ge=0,
        description=(
            "The expert plan version measuredBalance is of; a plan the reconciler replaced since "
            "(expertPlanVersion differs) is not measured yet."
        ),
    )
    rebalance_message: str | None = Field(
        default=None, description="The rebalance loop's last verdict in words."
    )
    last_rebalance_time: datetime | None = Field(
        default=None, description="When the experts were last rebalanced on measured load."
    )
    rebalances: int | None = Field(
        default=None, ge=0, description="Rebalances on measured load so far."
    )
    last_experts_moved: int | None = Field(
        default=None, ge=0, description="Expert copies the last rebalance loaded onto GPUs."
    )


class PlacementStatus(ExpertRebalancing, RenderedPlacement):
    """status.placement as read: the rendered placement and the rebalance loop's measurements."""


class FitStatus(ApiModel):
    """The fit check's layout and per-GPU memory (GiB)."""

    fits: bool = Field(description="Whether one replica fits the cluster's GPUs.")
    gpu_product: str | None = Field(default=None, description="GPU product checked.")
    gpus_per_replica: int = Field(default=0, ge=0, description="GPUs of one replica.")
    nodes_per_replica: int = Field(default=0, ge=0, description="Nodes of one replica.")
    tensor_parallel: int = Field(default=0, ge=0, description="Tensor-parallel width.")
    data_parallel: int = Field(default=0, ge=0, description="Data-parallel ranks.")
    pipeline_parallel: int = Field(default=0, ge=0, description="Pipeline stages.")
    expert_parallel: int = Field(default=0, ge=0, description="GPUs the experts spread over.")
    weights_gib_per_gpu: float = Field(default=0.0, description="Weights on each GPU.")
    kv_cache_gib_per_gpu: float = Field(default=0.0, description="KV cache of one full context.")
    activations_gib_per_gpu: float = Field(default=0.0, description="Activation headroom.")
    usable_gib_per_gpu: float = Field(default=0.0, description="Memory the engine may use.")
    message: str = Field(default="", description="The verdict in words.")


class AutoscalingStatus(ApiModel):
    """The autoscaler's last decision (present once autoscaling has run)."""

    manages_replicas: bool = Field(
        description=(
            "True: the autoscaler owns spec.replicas and overwrites manual changes (kubectl "
            "scale); false: autoscaling is off or advisory and spec.replicas is left to you."
        )
    )
    mode: AutoscalingMode | None = Field(
        default=None,
        description=(
            "The mode of the last decision: apply, or advisory (desiredReplicas is advice only)."
        ),
    )
    desired_replicas: int | None = Field(
        default=None, ge=0, description="Replicas the policy asked for at the last decision."
    )
    reason: str = Field(
        default="",
        description=(
            "Why: scale_up_burst, scale_up_trend, scale_from_zero, scale_down_lull, "
            "hold_stable, hold_metrics_stale, hold_cooldown, clamp_min or clamp_max."
        ),
    )
    message: str = Field(default="", description="The decision in words, with its numbers.")
    metrics_source: str = Field(
        default="", description="Where serving metrics were read: prometheus URL or direct."
    )
    tokens_per_second: float | None = Field(
        default=None, ge=0, description="Prompt plus generated tokens/s measured, all replicas."
    )
    waiting_tokens: float | None = Field(
        default=None, ge=0, description="Prompt tokens queued, not yet prefilled, all replicas."
    )
    capacity_tokens_per_second: float | None = Field(
        default=None, ge=0, description="Tokens/s per replica the policy counted on."
    )
    last_decision_time: datetime | None = Field(
        default=None, description="When the autoscaler last decided."
    )
    last_scale_time: datetime | None = Field(
        default=None, description="When the autoscaler last changed spec.replicas."
    )


class ReconciledStatus(ApiModel):
    """The part of the status the reconciler alone writes, whole on every reconciliation (a
    null placement or fit in the merge patch removes a stale one)."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing, Degraded and Fits.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    replicas: int = Field(default=0, ge=0, description="Replicas rendered (the /scale status).")
    ready_replicas: int = Field(default=0, ge=0, description="Replicas serving.")
    selector: str = Field(default="", description="Label selector of the pods, for /scale.")
    endpoint: str = Field(default="", description="URL of the OpenAI-compatible endpoint.")
    placement: RenderedPlacement | None = Field(
        default=None, description="Cluster and expert placement."
    )
    fit: FitStatus | None = Field(default=None, description="The fit check.")


class AutoscalerReport(ApiModel):
    """The part of the status the autoscaler alone writes: its decision, and the tokens/s it
    measured (left as they are when this decision had no measurement)."""

    autoscaling: AutoscalingStatus
    tokens_per_second: float | None = Field(
        default=None, ge=0, exclude_if=lambda measured: measured is None
    )


class RebalancerReport(ApiModel):
    """The part of the status the rebalance loop alone writes: only the fields it sets are
    sent (`model_dump(exclude_unset=True)`), so an unchanged verdict is not rewritten."""

    placement: ExpertRebalancing


# As read: the reconciler's part, with the rebalance loop's fields in `placement` and the
# autoscaler's `tokensPerSecond` and `autoscaling` (the docstring is the CRD's description).
class Llama4DeploymentStatus(ReconciledStatus):
    """The observed state, written by the operator."""

    placement: PlacementStatus | None = Field(
        default=None, description="Cluster and expert placement."
    )
    tokens_per_second: float = Field(
        default=0.0,
        ge=0,
        description="Tokens per second (prompt plus generated), all replicas, as the autoscaler "
        "last measured them (0 until it runs).",
    )
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="The autoscaler's last decision, and whether it owns replicas."
    )
