"""The fit check: does a model, at a precision and context length, fit a cluster's GPUs, and how?

Pure arithmetic, no I/O. For each candidate layout of one replica (1, 2, 4... GPUs on one node,
then whole nodes) it adds up the memory each GPU needs and keeps the smallest layout that fits:

- weights: linear layers at the quantisation's bytes per parameter (int4 carries one bf16 scale
  per group of 128), embeddings, LM head and routers in bf16. Routed experts are spread over the
  expert-parallel GPUs; everything else over the tensor x pipeline GPUs (data-parallel ranks hold
  their own copy).
- KV cache: room for one sequence of the maximum context length in bf16 (the engine's own
  minimum to start). Grouped-query layers keep 2 x KV heads x head dim per token; latent-attention
  layers keep the latent plus the RoPE key. Chunked-attention (iRoPE) layers keep at most one
  chunk; only the global layers grow with the context. KV heads shard over tensor-parallel ranks
  (at most one head each), layers over pipeline stages.
- activations: a prefill step's working set (residual stream and attention buffers, routed FFN
  intermediates, float32 logits) plus 1 GiB for CUDA graphs and communication buffers.
- usable memory: 90% of the GPU (vLLM's default `gpu_memory_utilization`), leaving the rest to
  the CUDA context and allocator fragmentation.

The numbers are estimates for planning and for refusing the impossible early, not a guarantee
that the engine will start; docs/fit-check.md walks through them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llama4_operator.api.catalog import CATALOG, architecture_of
from llama4_operator.api.models import (
    BatchingSpec,
    CustomArchitecture,
    Llama4DeploymentSpec,
    ParallelismSpec,
    Quantization,
)
from llama4_operator.planners.gpu_products import (
    GIB,
    GpuProduct,
    UnknownGpuProductError,
    resolve_product,
)

BYTES_PER_PARAMETER: dict[Quantization, float] = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 / 128}
KV_BYTES_PER_VALUE = 2  # bf16
EMBEDDING_BYTES_PER_PARAMETER = 2  # embeddings, LM head and routers stay bf16
GPU_MEMORY_UTILIZATION = 0.90
RUNTIME_OVERHEAD_BYTES = GIB
MAX_NODES_PER_REPLICA = 64
MIN_CONTEXT = 128
# Residual stream, norm output, q/k/v/o and attention output buffers of one token, in hidden-size
# bf16 vectors; a deliberately round upper bound of what one transformer layer keeps alive.
ACTIVATION_VECTORS_PER_TOKEN = 12
QUANTIZATION_ORDER: tuple[Quantization, ...] = ("bf16", "fp8", "int4")


@dataclass(frozen=True)
class ModelFootprint:
    """Parameter counts and KV bytes per token of an architecture (see `footprint`)."""

    routed_expert_params: int
    other_linear_params: int
    bf16_params: int
    kv_bytes_per_token_global: int
    kv_bytes_per_token_chunked: int
    attention_chunk_size: int | None
    kv_shardable_heads: int
    active_params: int

    @property
    def total_params(self) -> int:
        return self.routed_expert_params + self.other_linear_params + self.bf16_params

    def weight_bytes(self, quantization: Quantization) -> tuple[float, float]:
        """(routed expert bytes, all other weight bytes) at a quantisation."""
        per_param = BYTES_PER_PARAMETER[quantization]
        experts = self.routed_expert_params * per_param
        other = self.other_linear_params * per_param + self.bf16_params * 2
        return experts, other

    def kv_cache_bytes(self, context: int) -> int:
        """KV cache of one sequence of `context` tokens."""
        chunked_tokens = context
        if self.attention_chunk_size is not None:
            chunked_tokens = min(context, self.attention_chunk_size)
        return (
            self.kv_bytes_per_token_global * context
            + self.kv_bytes_per_token_chunked * chunked_tokens
        )


def footprint(arch: CustomArchitecture) -> ModelFootprint:
    """Count an architecture's parameters and per-token KV bytes, layer by layer."""
    hidden = arch.hidden_size
    expert = 3 * hidden * arch.intermediate_size  # SwiGLU: gate, up, down
    dense_ffn = 3 * hidden * (arch.intermediate_size_mlp or arch.intermediate_size)
    attention = (
        2 * hidden * arch.num_attention_heads * arch.head_dim  # q and o
        + 2 * hidden * arch.num_key_value_heads * arch.head_dim  # k and v
    )
    if arch.kv_lora_rank is not None:
        kv_per_layer = (arch.kv_lora_rank + arch.qk_rope_head_dim) * KV_BYTES_PER_VALUE
        shardable_heads = 1  # the latent is shared by every head
    else:
        kv_per_layer = 2 * arch.num_key_value_heads * arch.head_dim * KV_BYTES_PER_VALUE
        shardable_heads = arch.num_key_value_heads
    routed = other = router = kv_global = kv_chunked = active = 0
    for layer in range(arch.num_hidden_layers):
        other += attention
        active += attention
        if arch.is_moe_layer(layer):
            routed += arch.num_local_experts * expert
            other += arch.num_shared_experts * expert
            router += hidden * arch.num_local_experts
            active += (arch.num_experts_per_tok + arch.num_shared_experts) * expert
        else:
            other += dense_ffn
            active += dense_ffn
        if arch.is_global_attention_layer(layer):
            kv_global += kv_per_layer
        else:
            kv_chunked += kv_per_layer
    embeddings = 2 * arch.vocab_size * hidden  # input embeddings and an untied LM head
    return ModelFootprint(
        routed_expert_params=routed,
        other_linear_params=other,
        bf16_params=embeddings + router,
        kv_bytes_per_token_global=kv_global,
        kv_bytes_per_token_chunked=kv_chunked,
        attention_chunk_size=arch.attention_chunk_size,
        kv_shardable_heads=shardable_heads,
        active_params=active + embeddings,
    )


def activation_bytes(arch: CustomArchitecture, batching: BatchingSpec) -> int:
    """Activation headroom of one GPU for one engine step (not sharded: an upper bound)."""
    tokens = batching.max_num_batched_tokens
    residual = tokens * arch.hidden_size * 2 * ACTIVATION_VECTORS_PER_TOKEN
    routed_ffn = tokens * arch.num_experts_per_tok * arch.intermediate_size * 2 * 2
    logits = batching.max_num_seqs * arch.vocab_size * 4
    return residual + routed_ffn + logits + RUNTIME_OVERHEAD_BYTES


@dataclass(frozen=True)
class Layout:
    """How one replica's GPUs split the model."""

    tensor: int
    data: int
    pipeline: int
    expert_parallel: bool
    gpus_per_node: int  # GPUs each worker (node) uses
    nodes: int

    @property
    def gpus(self) -> int:
        return self.tensor * self.data * self.pipeline

    @property
    def expert_width(self) -> int:
        """GPUs the routed experts are spread over."""
        return self.gpus if self.expert_parallel else self.tensor * self.pipeline

    def describe(self) -> str:
        return (
            f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node}; tensor "
            f"{self.tensor}, data {self.data}, pipeline {self.pipeline}, experts over "
            f"{self.expert_width} GPU{'s' if self.expert_width != 1 else ''}"
        )


@dataclass(frozen=True)
class MemoryPerGpu:
    """Bytes one GPU needs, and may use."""

    weights: float
    kv_cache: float
    activations: float
    usable: float

    @property
    def needed(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.needed <= self.usable

    def describe(self) -> str:
        return (
            f"{_gib(self.weights)} weights + {_gib(self.kv_cache)} KV cache + "
            f"{_gib(self.activations)} activations = {_gib(self.needed)} of "
            f"{_gib(self.usable)} usable per GPU"
        )


@dataclass(frozen=True)
class FitRequest:
    """What the fit check needs from a spec."""

    model_name: str
    architecture: CustomArchitecture
    quantization: Quantization
    max_context_length: int
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    parallelism: ParallelismSpec = field(default_factory=ParallelismSpec)
    gpus_per_node: int | None = None
    gpu_product: str | None = None

    @classmethod
    def from_spec(cls, spec: Llama4DeploymentSpec) -> FitRequest:
        model = spec.model
        name = CATALOG[model.variant].display_name if model.variant != "custom" else "custom model"
        return cls(
            model_name=name,
            architecture=architecture_of(model),
            quantization=model.quantization,
            max_context_length=model.max_context_length,
            batching=spec.serving.batching,
            parallelism=spec.resources.parallelism,
            gpus_per_node=spec.resources.gpus_per_node,
            gpu_product=spec.resources.gpu_product,
        )

    def with_changes(
        self, quantization: Quantization | None = None, context: int | None = None
    ) -> FitRequest:
        return FitRequest(
            model_name=self.model_name,
            architecture=self.architecture,
            quantization=quantization or self.quantization,
            max_context_length=context or self.max_context_length,
            batching=self.batching,
            parallelism=self.parallelism,
            gpus_per_node=self.gpus_per_node,
            gpu_product=self.gpu_product,
        )

    def describe(self) -> str:
        return f"{self.model_name} ({self.quantization}, {self.max_context_length}-token context)"


@dataclass(frozen=True)
class ProductCapacity:
    """The schedulable nodes of one GPU product: allocatable GPUs of each."""

    product: GpuProduct
    node_gpus: tuple[int, ...]

    @property
    def total_gpus(self) -> int:
        return sum(self.node_gpus)

    @property
    def max_gpus_per_node(self) -> int:
        return max(self.node_gpus, default=0)

    def can_host(self, layout: Layout) -> bool:
        """Whether enough nodes have the GPUs one replica of `layout` needs."""
        return sum(1 for gpus in self.node_gpus if gpus >= layout.gpus_per_node) >= layout.nodes

    def describe(self) -> str:
        nodes = len(self.node_gpus)
        per_node = sorted(set(self.node_gpus))
        shape = "/".join(str(g) for g in per_node)
        return (
            f"{self.total_gpus} x {self.product.short_name} ({nodes} node"
            f"{'s' if nodes != 1 else ''} x {shape})"
        )


@dataclass(frozen=True)
class FitResult:
    """The fit check's verdict for a spec and a cluster."""

    fits: bool
    message: str
    product: GpuProduct | None = None
    layout: Layout | None = None
    memory: MemoryPerGpu | None = None
    suggestions: tuple[str, ...] = ()


def memory_per_gpu(
    request: FitRequest, layout: Layout, product: GpuProduct, model: ModelFootprint | None = None
) -> MemoryPerGpu:
    """Bytes each GPU of `layout` needs for the request, and may use on `product`."""
    model = model or footprint(request.architecture)
    experts, other = model.weight_bytes(request.quantization)
    weights = experts / layout.expert_width + other / (layout.tensor * layout.pipeline)
    kv_shards = min(layout.tensor, model.kv_shardable_heads) * layout.pipeline
    kv_cache = model.kv_cache_bytes(request.max_context_length) / kv_shards
    return MemoryPerGpu(
        weights=weights,
        kv_cache=kv_cache,
        activations=float(activation_bytes(request.architecture, request.batching)),
        usable=product.memory_bytes * GPU_MEMORY_UTILIZATION,
    )


class LayoutError(ValueError):
    """A manual parallelism that no node shape can host."""


def candidate_layouts(request: FitRequest, gpus_per_node: int) -> Iterator[Layout]:
    """Layouts of one replica, smallest first (manual parallelism: just the one asked for)."""
    arch = request.architecture
    parallelism = request.parallelism
    if parallelism.strategy == "manual":
        tensor, data = parallelism.tensor or 1, parallelism.data or 1
        gpus = tensor * data * parallelism.pipeline
        if gpus <= gpus_per_node:
            nodes, per_node = 1, gpus
        elif gpus % gpus_per_node == 0:
            nodes, per_node = gpus // gpus_per_node, gpus_per_node
        else:
            raise LayoutError(
                f"resources.parallelism: tensor x data x pipeline = {gpus} GPUs is neither at "
                f"most nor a multiple of {gpus_per_node} GPUs per node; change the sizes or "
                "resources.gpusPerNode"
            )
        yield Layout(
            tensor, data, parallelism.pipeline, parallelism.expert_parallel, per_node, nodes
        )
        return
    # Tensor parallelism may not exceed the heads it splits; the rest of a node is data-parallel.
    heads = arch.num_key_value_heads if arch.kv_lora_rank is None else arch.num_attention_heads
    sizes = sorted({1 << k for k in range(7) if 1 << k <= gpus_per_node} | {gpus_per_node})
    for gpus in sizes:
        tensor = math.gcd(gpus, heads)
        yield Layout(tensor, gpus // tensor, 1, parallelism.expert_parallel, gpus, 1)
    tensor = math.gcd(gpus_per_node, heads)
    for nodes in range(2, min(MAX_NODES_PER_REPLICA, arch.num_hidden_layers) + 1):
        yield Layout(
            tensor,
            gpus_per_node // tensor,
            nodes,
            parallelism.expert_parallel,
            gpus_per_node,
            nodes,
        )


def smallest_layout(
    request: FitRequest, product: GpuProduct, gpus_per_node: int
) -> tuple[Layout, MemoryPerGpu] | None:
    """The first candidate layout whose per-GPU memory fits `product`, or None."""
    model = footprint(request.architecture)
    for layout in candidate_layouts(request, gpus_per_node):
        memory = memory_per_gpu(request, layout, product, model)
        if memory.fits:
            return layout, memory
    return None


def _layout_in_capacity(
    request: FitRequest, capacity: ProductCapacity, gpus_per_node: int
) -> tuple[Layout, MemoryPerGpu] | None:
    found = smallest_layout(request, capacity.product, gpus_per_node)
    if found is not None and capacity.can_host(found[0]):
        return found
    return None


def _longest_context_that_fits(
    request: FitRequest, capacity: ProductCapacity, gpus_per_node: int
) -> int | None:
    """Binary search for the longest context with a layout inside `capacity`."""
    low, high = MIN_CONTEXT, request.max_context_length - 1
    if high < low or not _layout_in_capacity(
        request.with_changes(context=low), capacity, gpus_per_node
    ):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if _layout_in_capacity(request.with_changes(context=middle), capacity, gpus_per_node):
            low = middle
        else:
            high = middle - 1
    return low


def _suggestions(
    request: FitRequest,
    capacity: ProductCapacity,
    gpus_per_node: int,
    needed: Layout | None,
) -> tuple[str, ...]:
    out: list[str] = []
    cheaper = QUANTIZATION_ORDER[QUANTIZATION_ORDER.index(request.quantization) + 1 :]
    for quantization in cheaper:
        found = _layout_in_capacity(
            request.with_changes(quantization=quantization), capacity, gpus_per_node
        )
        if found is not None:
            gpus = found[0].gpus
            out.append(
                f"model.quantization: {quantization} ({gpus} GPU{'s' if gpus != 1 else ''} "
                "per replica)"
            )
            break
    if needed is not None:
        missing_nodes = needed.nodes - sum(
            1 for gpus in capacity.node_gpus if gpus >= needed.gpus_per_node
        )
        out.append(
            f"{missing_nodes} more node{'s' if missing_nodes != 1 else ''} with "
            f"{needed.gpus_per_node} x {capacity.product.short_name}"
        )
    context = _longest_context_that_fits(request, capacity, gpus_per_node)
    if context is not None:
        out.append(f"model.maxContextLength: {context} or less")
    return tuple(out)


def check_product(request: FitRequest, capacity: ProductCapacity) -> FitResult:
    """Fit the request on one GPU product's nodes."""
    product = capacity.product
    gpus_per_node = request.gpus_per_node or capacity.max_gpus_per_node
    try:
        found = smallest_layout(request, product, gpus_per_node)
    except LayoutError as error:
        return FitResult(fits=False, message=str(error), product=product)
    if found is not None and capacity.can_host(found[0]):
        layout, memory = found
        return FitResult(
            fits=True,
            product=product,
            layout=layout,
            memory=memory,
            message=(
                f"{request.describe()} fits {layout.gpus} x {product.short_name} per replica "
                f"({layout.describe()}): {memory.describe()}"
            ),
        )
    if found is None and request.parallelism.strategy == "manual":
        # Only the asked-for layout was tried: name it and what it would need per GPU.
        (manual,) = candidate_layouts(request, gpus_per_node)
        manual_memory = memory_per_gpu(request, manual, product)
        what = (
            f"does not fit the manual layout resources.parallelism asks for "
            f"({manual.gpus} x {product.short_name}: {manual.describe()}): "
            f"{manual_memory.describe()}"
        )
        needed: Layout | None = None
    elif found is None:
        what = (
            f"does not fit any layout of up to {MAX_NODES_PER_REPLICA} nodes x {gpus_per_node} "
            f"{product.short_name}"
        )
        needed = None
    else:
        needed, memory = found
        what = (
            f"needs {needed.gpus} x {product.short_name} per replica ({needed.describe()}): "
            f"{memory.describe()}"
        )
    suggestions = _suggestions(request, capacity, gpus_per_node, needed)
    message = f"{request.describe()} {what}; the cluster has {capacity.describe()}"
    if suggestions:
        message += ". Would fit with: " + "; or ".join(suggestions)
    return FitResult(
        fits=False,
        message=message,
        product=product,
        layout=needed,
        memory=found[1] if found else None,
        suggestions=suggestions,
    )


def check_fit(request: FitRequest, capacities: Sequence[ProductCapacity]) -> FitResult:
    """Fit the request on the cluster: the asked-for product, or the one needing fewest GPUs."""
    if request.gpu_product is not None:
        capacities = [c for c in capacities if c.product.label == request.gpu_product]
        if not capacities:
            return FitResult(
                fits=False,
                message=(
                    f"no schedulable node has nvidia.com/gpu.product={request.gpu_product} with "
                    "allocatable nvidia.com/gpu; fix resources.gpuProduct or add such nodes"
                ),
            )
    if not capacities:
        return FitResult(
            fits=False,
            message=(
                f"{request.describe()}: the cluster has no schedulable node with allocatable "
                "nvidia.com/gpu"
            ),
        )
    results = [check_product(request, capacity) for capacity in capacities]
    fitting = [r for r in results if r.fits and r.layout is not None]
    if fitting:
        return min(
            fitting,
            key=lambda r: (
                r.layout.gpus if r.layout else 0,
                -(r.product.memory_mib if r.product else 0),
            ),
        )
    if len(results) == 1:
        return results[0]
    return FitResult(fits=False, message=" | ".join(r.message for r in results))


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


class GpuNodeLike(Protocol):
    """The node fields the fit check reads (`cluster_placement.GpuNode` has them)."""

    @property
    def gpu_product(self) -> str: ...
    @property
    def gpu_memory_mib(self) -> int: ...
    @property
    def allocatable_gpus(self) -> int: ...
    @property
    def schedulable(self) -> bool: ...


def capacities_from_nodes(nodes: Iterable[GpuNodeLike]) -> tuple[list[ProductCapacity], list[str]]:
    """Group schedulable GPU nodes by product; also returns why some nodes were left out."""
    grouped: dict[str, tuple[GpuProduct, list[int]]] = {}
    skipped: list[str] = []
    for node in nodes:
        if not node.schedulable or node.allocatable_gpus <= 0:
            continue
        try:
            product = resolve_product(node.gpu_product or None, node.gpu_memory_mib or None)
        except UnknownGpuProductError as error:
            skipped.append(str(error))
            continue
        grouped.setdefault(product.label, (product, []))[1].append(node.allocatable_gpus)
    capacities = [
        ProductCapacity(product, tuple(sorted(gpus, reverse=True)))
        for product, gpus in grouped.values()
    ]
    return capacities, skipped
