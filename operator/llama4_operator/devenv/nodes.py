"""Simulated GPU nodes: pools of KWOK-managed Node objects labelled as GPU nodes really are.

Pure: turns pool descriptions into Node manifests. Labels follow NVIDIA GPU feature discovery
(`nvidia.com/gpu.product`, `nvidia.com/gpu.memory` in MiB, `nvidia.com/gpu.count`), the standard
zone label for failure domains, and the project's own labels for node pools and NVLink domains.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
SIMULATED_NODE_LABEL = "llama4.dev/simulated"
NODE_POOL_LABEL = "llama4.dev/node-pool"
NVLINK_DOMAIN_LABEL = "llama4.dev/nvlink-domain"
ZONE_LABEL = "topology.kubernetes.io/zone"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class GpuModel:
    product_label: str
    memory_mib: int


# Values as GPU feature discovery reports them for these boards.
GPU_MODELS: dict[str, GpuModel] = {
    "h100": GpuModel("NVIDIA-H100-80GB-HBM3", 81559),
    "h200": GpuModel("NVIDIA-H200", 143771),
    "a100": GpuModel("NVIDIA-A100-SXM4-80GB", 81920),
    "l40s": GpuModel("NVIDIA-L40S", 46068),
    "b200": GpuModel("NVIDIA-B200", 183359),
}


@dataclass(frozen=True)
class NodePool:
    """`count` identical GPU nodes. `nodes_per_nvlink_domain` > 1 models rack-scale NVLink
    (e.g. 18 trays of 4 GPUs in one NVL72 domain); HGX hosts are each their own domain."""

    name: str = "pool-0"
    count: int = 16
    gpus_per_node: int = 8
    gpu: str = "h100"
    zones: int = 2
    nodes_per_nvlink_domain: int = 1

    def __post_init__(self) -> None:
        if self.gpu not in GPU_MODELS:
            raise ValueError(
                f"pool {self.name}: unknown gpu {self.gpu!r}; known: {list(GPU_MODELS)}"
            )
        if self.count < 0 or self.gpus_per_node < 0 or self.zones < 1:
            raise ValueError(f"pool {self.name}: count and gpus_per_node >= 0, zones >= 1")
        if self.nodes_per_nvlink_domain < 1:
            raise ValueError(f"pool {self.name}: nodes_per_nvlink_domain must be >= 1")

    def node_names(self) -> list[str]:
        return [f"gpu-{self.name}-{index:04d}" for index in range(self.count)]


_POOL_SPEC = re.compile(
    r"^(?:(?P<name>[a-z0-9-]+)=)?(?P<gpu>[a-z0-9]+):(?P<count>\d+)x(?P<gpus>\d+)"
    r"(?:,zones=(?P<zones>\d+))?(?:,nvlink=(?P<nvlink>\d+))?$"
)


def parse_pool(spec: str, index: int = 0) -> NodePool:
    """`[NAME=]GPU:COUNTxGPUS[,zones=Z][,nvlink=N]`, e.g. `h100:16x8` or `big=b200:4x8,zones=1`."""
    match = _POOL_SPEC.match(spec.strip())
    if not match:
        raise ValueError(
            f"node pool {spec!r} is not of the form [NAME=]GPU:COUNTxGPUS[,zones=Z][,nvlink=N], "
            "for example h100:16x8"
        )
    return NodePool(
        name=match["name"] or f"pool-{index}",
        count=int(match["count"]),
        gpus_per_node=int(match["gpus"]),
        gpu=match["gpu"],
        zones=int(match["zones"] or 2),
        nodes_per_nvlink_domain=int(match["nvlink"] or 1),
    )


def node_manifests(pool: NodePool) -> list[dict[str, Any]]:
    """Node objects for a pool: zones take contiguous blocks so NVLink domains stay in one zone."""
    model = GPU_MODELS[pool.gpu]
    per_zone = max(1, math.ceil(pool.count / pool.zones))
    nodes = []
    for index, name in enumerate(pool.node_names()):
        zone = f"zone-{chr(ord('a') + min(index // per_zone, pool.zones - 1))}"
        domain = f"{pool.name}-nvl-{index // pool.nodes_per_nvlink_domain:04d}"
        resources = {
            "cpu": "128",
            "memory": "2Ti",
            "pods": "110",
            "ephemeral-storage": "4Ti",
            GPU_RESOURCE: str(pool.gpus_per_node),
        }
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        SIMULATED_NODE_LABEL: "true",
                        NODE_POOL_LABEL: pool.name,
                        NVLINK_DOMAIN_LABEL: domain,
                        ZONE_LABEL: zone,
                        GPU_PRODUCT_LABEL: model.product_label,
                        GPU_MEMORY_LABEL: str(model.memory_mib),
                        GPU_COUNT_LABEL: str(pool.gpus_per_node),
                        "nvidia.com/gpu.present": "true",
                    },
                },
                "spec": {},
                "status": {"capacity": resources, "allocatable": dict(resources)},
            }
        )
    return nodes
