"""GPU products the fit check knows, keyed by the `nvidia.com/gpu.product` node label.

The label values and memory sizes are what NVIDIA's GPU feature discovery publishes
(`nvidia.com/gpu.product`, `nvidia.com/gpu.memory` in MiB, as `nvidia-smi` reports the framebuffer).
An unknown product falls back to the node's `nvidia.com/gpu.memory` label.
"""

from __future__ import annotations

from dataclasses import dataclass

PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"
COUNT_LABEL = "nvidia.com/gpu.count"
GPU_RESOURCE = "nvidia.com/gpu"

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class GpuProduct:
    """One GPU model: its label value, a short name for messages, and its memory."""

    label: str
    short_name: str
    memory_mib: int

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


KNOWN_PRODUCTS: dict[str, GpuProduct] = {
    product.label: product
    for product in (
        GpuProduct("NVIDIA-H100-80GB-HBM3", "H100 80GB", 81559),
        GpuProduct("NVIDIA-H100-PCIe", "H100 PCIe 80GB", 81559),
        GpuProduct("NVIDIA-H100-NVL", "H100 NVL 94GB", 95830),
        GpuProduct("NVIDIA-H200", "H200 141GB", 143771),
        GpuProduct("NVIDIA-B200", "B200 180GB", 183359),
        GpuProduct("NVIDIA-A100-SXM4-80GB", "A100 80GB", 81920),
        GpuProduct("NVIDIA-A100-80GB-PCIe", "A100 PCIe 80GB", 81920),
        GpuProduct("NVIDIA-A100-SXM4-40GB", "A100 40GB", 40960),
        GpuProduct("NVIDIA-A100-PCIE-40GB", "A100 PCIe 40GB", 40960),
        GpuProduct("NVIDIA-L40S", "L40S 48GB", 46068),
    )
}


class UnknownGpuProductError(ValueError):
    """Neither the product table nor a memory label tells the GPU's memory."""


def resolve_product(label: str | None, memory_mib_label: str | int | None = None) -> GpuProduct:
    """The product for a node's labels: the table entry, else one built from the memory label."""
    if label and label in KNOWN_PRODUCTS:
        return KNOWN_PRODUCTS[label]
    try:
        memory_mib = int(memory_mib_label) if memory_mib_label is not None else 0
    except ValueError:
        memory_mib = 0
    if memory_mib <= 0:
        raise UnknownGpuProductError(
            f"GPU product {label!r} is not in the table and the node has no numeric "
            f"{MEMORY_LABEL} label; label the node with its GPU memory in MiB"
        )
    name = label or f"GPU {memory_mib} MiB"
    return GpuProduct(label or name, name, memory_mib)
