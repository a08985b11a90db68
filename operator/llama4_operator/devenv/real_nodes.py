"""Real kubelet nodes beside KWOK's simulated ones: containerd, runc, CNI and kube-proxy.

Each real node lives in its own network namespace, joined to the host by a veth pair on a bridge
the cluster owns, the way kind gives each node a container: the kubelet, containerd (and so every
pod network) and kube-proxy run inside it, and the API server listens on the bridge's address so
the node and its pods reach it. Nothing listens on or sends to the machine's own interfaces.

The node advertises `nvidia.com/gpu` and the GPU feature-discovery labels of its pool, so the
planners and the scheduler treat it as a GPU node; the containers run on the CPU.

The configuration builders at the top are pure (unit-tested); `NodeHost` below makes and removes
the host state (bridge, namespaces, cgroups, mounts) and records all of it so `down` leaves nothing.

Images outlive nodes: `down` moves each node's containerd root (image content and unpacked layers,
gigabytes for the Ray image) into a pool in the cache, and a new node takes one from there, so an
image is imported once, not at every `up`. A root moves by rename, so no two nodes share one.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama4_operator.devenv import paths
from llama4_operator.devenv.nodes import (
    GPU_COUNT_LABEL,
    GPU_MEMORY_LABEL,
    GPU_MODELS,
    GPU_PRODUCT_LABEL,
    NODE_POOL_LABEL,
    NVLINK_DOMAIN_LABEL,
    ZONE_LABEL,
)

REAL_NODE_LABEL = "llama4.dev/real-node"
REAL_POOL = "real"
CNI_PLUGINS = Path("/usr/lib/cni")
RUNC = Path("/usr/sbin/runc")
# Debian packages the real nodes need from the host (installed by `make system-deps`).
HOST_PACKAGES = {
    "runc": RUNC,
    "containernetworking-plugins": CNI_PLUGINS / "bridge",
    "nftables": Path("/usr/sbin/nft"),
    "iptables": Path("/usr/sbin/iptables"),
    "busybox-static": Path("/usr/bin/busybox"),
    "util-linux": Path("/usr/bin/nsenter"),
    "iproute2": Path("/usr/sbin/ip"),
}
CGROUP_ROOT = Path("/sys/fs/cgroup")
SERVICE_CIDR = "10.96.0.0/16"  # the API server's --service-cluster-ip-range
CLUSTER_DNS_IP = "10.96.0.10"  # the conventional kube-dns address in the Service range
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 10248
KUBE_PROXY_HEALTHZ_PORT = 10256
# Unix socket names are limited to 108 bytes (the kubelet makes sockets deep in its root
# directory), so nodes keep their state under short fixed roots rather than in the cluster's
# directory, which may be anywhere.
SOCKETS_ROOT = Path("/run/llama4-nodes")
NODES_ROOT = Path("/var/lib/llama4-nodes")


class RealNodeError(RuntimeError):
    """A real node could not be set up; the message names the step and the fix."""


@dataclass(frozen=True)
class RealNode:
    """Where one real node lives: names and addresses, all derived from the cluster's id."""

    name: str
    index: int
    netns: str
    veth: str
    address: str  # on the cluster's bridge
    pod_subnet: str
    cgroup_parent: str  # the kubelet's cgroupRoot, under every hierarchy
    directory: Path
    sockets: Path
    gpus: int
    gpu: str

    @property
    def containerd_socket(self) -> Path:
        return self.sockets / "containerd.sock"

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.netns

    def enter(self, command: Sequence[str]) -> list[str]:
        """`command` run inside the node's network namespace (and nothing else: the mount
        namespace stays the host's, so cgroups and the kubelet's mounts are where `down` looks)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *command]

    def labels(self) -> dict[str, str]:
        model = GPU_MODELS[self.gpu]
        return {
            REAL_NODE_LABEL: "true",
            NODE_POOL_LABEL: REAL_POOL,
            NVLINK_DOMAIN_LABEL: f"{REAL_POOL}-nvl-{self.index:04d}",
            ZONE_LABEL: "zone-a",
            GPU_PRODUCT_LABEL: model.product_label,
            GPU_MEMORY_LABEL: str(model.memory_mib),
            GPU_COUNT_LABEL: str(self.gpus),
            "nvidia.com/gpu.present": "true",
        }


@dataclass(frozen=True)
class NodeNetwork:
    """The cluster's bridge: the API server listens on `gateway`, node i is `.10+i`."""

    cluster_id: str
    bridge: str
    subnet: str
    gateway: str

    def node(self, index: int, *, gpus: int, gpu: str = "h100") -> RealNode:
        hosts = list(ipaddress.ip_network(self.subnet).hosts())
        third_octet = ipaddress.ip_network(self.subnet).network_address.packed[2]
        return RealNode(
            name=f"real-node-{index}",
            index=index,
            netns=f"l4n{self.cluster_id}-{index}",
            veth=f"l4v{self.cluster_id}{index}",
            address=str(hosts[9 + index]),
            # Node i's pods: 10.(100+i).<cluster's octet>.0/24, unique across clusters and nodes.
            pod_subnet=f"10.{100 + index}.{third_octet}.0/24",
            cgroup_parent=f"/llama4-{self.cluster_id}-{index}",
            directory=NODES_ROOT / f"{self.cluster_id}-{index}",
            sockets=SOCKETS_ROOT / f"{self.cluster_id}-{index}",
            gpus=gpus,
            gpu=gpu,
        )


def cluster_id(directory: Path) -> str:
    return hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:6]


def node_network(directory: Path, used_subnets: Sequence[str] = ()) -> NodeNetwork:
    """A /24 in 10.250.0.0/16 that no address on the host already uses, chosen from the
    cluster's id so two clusters get different ones."""
    identifier = cluster_id(directory)
    used = {ipaddress.ip_network(subnet, strict=False) for subnet in used_subnets}
    start = int(identifier, 16) % 250
    for offset in range(250):
        octet = (start + offset) % 250 + 1
        subnet = ipaddress.ip_network(f"10.250.{octet}.0/24")
        if not any(subnet.overlaps(other) for other in used):
            return NodeNetwork(identifier, f"l4b{identifier}", str(subnet), f"10.250.{octet}.1")
    raise RealNodeError("no free /24 in 10.250.0.0/16 for the node network")


# -- configuration (pure) ------------------------------------------------------------------------


def containerd_config(
    node: RealNode, *, sandbox_image: str, cni_conf_dir: Path, runc: Path = RUNC
) -> str:
    """containerd 2.x configuration (version 3): everything under the node's own directories."""
    runtime = "plugins.'io.containerd.cri.v1.runtime'"
    return "\n".join(
        [
            "version = 3",
            f"root = {json.dumps(str(node.directory / 'containerd' / 'root'))}",
            f"state = {json.dumps(str(node.sockets / 'state'))}",
            "[grpc]",
            f"  address = {json.dumps(str(node.containerd_socket))}",
            "[ttrpc]",
            f"  address = {json.dumps(str(node.sockets / 'containerd.ttrpc.sock'))}",
            "[plugins.'io.containerd.internal.v1.opt']",
            f"  path = {json.dumps(str(node.directory / 'containerd' / 'opt'))}",
            "[plugins.'io.containerd.cri.v1.images']",
            "  snapshotter = 'overlayfs'",
            "[plugins.'io.containerd.cri.v1.images'.pinned_images]",
            f"  sandbox = {json.dumps(sandbox_image)}",
            f"[{runtime}]",
            # Root here lacks CAP_SYS_RESOURCE: lowering a process's oom_score_adj fails.
            "  restrict_oom_score_adj = true",
            "  netns_mounts_under_state_dir = true",
            f"[{runtime}.containerd.runtimes.runc]",
            "  runtime_type = 'io.containerd.runc.v2'",
            f"[{runtime}.containerd.runtimes.runc.options]",
            f"  BinaryName = {json.dumps(str(runc))}",
            f"  Root = {json.dumps(str(node.sockets / 'runc'))}",
            "  SystemdCgroup = false",
            f"[{runtime}.cni]",
            f"  bin_dirs = [{json.dumps(str(CNI_PLUGINS))}]",
            f"  conf_dir = {json.dumps(str(cni_conf_dir))}",
            "[plugins.'io.containerd.grpc.v1.cri']",
            "  stream_server_address = '127.0.0.1'",
            "  stream_server_port = '0'",
            "",
        ]
    )


def cni_config(node: RealNode, other_nodes: Sequence[RealNode] = ()) -> dict[str, Any]:
    """A bridge network for the node's pods; routes to the other real nodes' pods go through the
    node's own namespace (it routes them over the cluster bridge)."""
    return {
        "cniVersion": "1.0.0",
        "name": "llama4-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": node.pod_subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(node.directory / "cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    node: RealNode, *, ca: Path, serving_cert: Path, serving_key: Path
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.address,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": node.address,
        "healthzPort": KUBELET_HEALTHZ_PORT,
        "containerRuntimeEndpoint": f"unix://{node.containerd_socket}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup_parent,
        # These machines mount cgroup v1; kubelets from 1.35 refuse it unless told otherwise.
        "failCgroupV1": False,
        "failSwapOn": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "serverTLSBootstrap": False,
        "rotateCertificates": False,
        "clusterDomain": "cluster.local",
        "clusterDNS": [CLUSTER_DNS_IP],
        "podLogsDir": str(node.directory / "pod-logs"),
        "volumePluginDir": str(node.directory / "volume-plugins"),
        # The disk is shared with builds and caches: evict only when it is really full.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusReportFrequency": "20s",
    }


def kube_proxy_config(node: RealNode, kubeconfig: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "nftables",
        "hostnameOverride": node.name,
        "bindAddress": node.address,
        "healthzBindAddress": f"{node.address}:{KUBE_PROXY_HEALTHZ_PORT}",
        "metricsBindAddress": "127.0.0.1:10249",
        "clusterCIDR": node.pod_subnet,
        # A pod reaching a Service backed by a pod on the same bridge gets its answer back
        # through the node only if the node rewrote the source too.
        "nftables": {"masqueradeAll": True},
        # The node's namespace cannot change the machine-wide conntrack table size.
        "conntrack": {"maxPerCore": 0, "min": 0},
    }


DNS_PORT = 53


def resolv_conf(nameserver: str) -> str:
    """A resolv.conf for host processes that must resolve cluster names (KubeRay)."""
    return f"nameserver {nameserver}\nsearch svc.cluster.local cluster.local\noptions ndots:5\n"


def with_resolv_conf(resolv: Path, command: Sequence[str]) -> list[str]:
    """`command` in a private mount namespace where `resolv` is bind-mounted over
    /etc/resolv.conf; the mount goes away with the process."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "--",
        "sh",
        "-c",
        script,
        str(resolv),
        *command,
    ]


def corefile(*, address: str, port: int, ready_port: int, kubeconfig: Path) -> str:
    """CoreDNS answering for Services and pods from the API server, on the bridge address (pods
    reach it through the `kube-dns` Service). No upstream: nothing outside is reachable."""
    return (
        f".:{port} {{\n"
        f"    bind {address}\n"
        "    errors\n"
        f"    ready {address}:{ready_port}\n"
        "    kubernetes cluster.local in-addr.arpa ip6.arpa {\n"
        f"        kubeconfig {kubeconfig}\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "    }\n"
        "    cache 30\n"
        "}\n"
    )


def dns_service_manifests(address: str, port: int) -> list[dict[str, Any]]:
    """The `kube-dns` Service at CLUSTER_DNS_IP, without a selector: its EndpointSlice points
    at CoreDNS on the host's bridge address."""
    ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {
                "clusterIP": CLUSTER_DNS_IP,
                "ports": [
                    {"name": name, "port": 53, "targetPort": port, "protocol": protocol}
                    for name, protocol in ports
                ],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-local",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "llama4ctl-dev",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [
                {"name": name, "port": port, "protocol": protocol} for name, protocol in ports
            ],
        },
    ]


def gpu_status_patch(node: RealNode) -> dict[str, Any]:
    """The extended resource the kubelet admits without a device plugin."""
    gpus = str(node.gpus)
    return {
        "status": {"capacity": {"nvidia.com/gpu": gpus}, "allocatable": {"nvidia.com/gpu": gpus}}
    }


# -- host state ----------------------------------------------------------------------------------


def missing_host_packages() -> list[str]:
    return [package for package, path in HOST_PACKAGES.items() if not path.exists()]


def _run(command: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RealNodeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result


def host_subnets() -> list[str]:
    """IPv4 networks already on the host's interfaces (so the node network avoids them)."""
    output = _run(["ip", "-4", "-j", "addr"]).stdout
    return [
        f"{address['local']}/{address['prefixlen']}"
        for interface in json.loads(output)
        for address in interface.get("addr_info", [])
    ]


def create_bridge(network: NodeNetwork) -> None:
    prefix = ipaddress.ip_network(network.subnet).prefixlen
    _run(["ip", "link", "add", network.bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{network.gateway}/{prefix}", "dev", network.bridge])
    _run(["ip", "link", "set", network.bridge, "up"])


def create_node_namespace(network: NodeNetwork, node: RealNode, others: Sequence[RealNode]) -> None:
    prefix = ipaddress.ip_network(network.subnet).prefixlen
    _run(["ip", "netns", "add", node.netns])
    _run(
        [
            "ip",
            "link",
            "add",
            node.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            node.netns,
        ]
    )
    _run(["ip", "link", "set", node.veth, "master", network.bridge, "up"])
    inside = ["ip", "-n", node.netns]
    _run([*inside, "addr", "add", f"{node.address}/{prefix}", "dev", "eth0"])
    _run([*inside, "link", "set", "eth0", "up"])
    _run([*inside, "link", "set", "lo", "up"])
    _run([*inside, "route", "add", "default", "via", network.gateway])
    # The node routes between its pods, the other nodes and the host (the CNI bridge plugin
    # would turn this on at the first pod; Services must work before that).
    _run(["ip", "netns", "exec", node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    # The host reaches the node's pods (the operator and Ray clients run there) through the node.
    _run(["ip", "route", "add", node.pod_subnet, "via", node.address, "dev", network.bridge])
    if not others:
        # ... and Services' cluster IPs through the first node's kube-proxy rules, as a client
        # inside the cluster would (the demo's OpenAI endpoint is its Service's cluster IP).
        # `replace`: of two local clusters with real nodes, the newer one's Services answer.
        _run(["ip", "route", "replace", SERVICE_CIDR, "via", node.address, "dev", network.bridge])
    for other in others:
        _run([*inside, "route", "add", other.pod_subnet, "via", other.address])
        _run(["ip", "-n", other.netns, "route", "add", node.pod_subnet, "via", node.address])


def cgroup_hierarchies() -> list[Path]:
    """Every mounted hierarchy under /sys/fs/cgroup (v1 controllers and the unified one)."""
    return sorted(
        path for path in CGROUP_ROOT.iterdir() if path.is_dir() and (path / "cgroup.procs").exists()
    )


def create_cgroup_parent(node: RealNode) -> None:
    """The kubelet refuses a cgroupRoot that does not exist in every hierarchy; a new cpuset
    needs its CPUs and memory nodes before a process may join it."""
    for hierarchy in cgroup_hierarchies():
        child = hierarchy / node.cgroup_parent.lstrip("/")
        child.mkdir(exist_ok=True)
        for inherited in ("cpuset.cpus", "cpuset.mems"):
            if (child / inherited).exists() and not (child / inherited).read_text().strip():
                (child / inherited).write_text((hierarchy / inherited).read_text())


def cgroup_processes(node: RealNode) -> set[int]:
    pids: set[int] = set()
    for hierarchy in cgroup_hierarchies():
        parent = hierarchy / node.cgroup_parent.lstrip("/")
        if not parent.exists():
            continue
        for procs in parent.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
    return pids


def kill_cgroup_processes(node: RealNode, timeout_s: float = 60) -> None:
    """SIGKILL what runs in the node's cgroups until none is left: a process with gigabytes
    mapped (a Ray worker) takes seconds to exit, and its cgroup cannot be removed before."""
    deadline = time.monotonic() + timeout_s
    while (pids := cgroup_processes(node)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.2)


def remove_cgroup_parent(node: RealNode) -> list[str]:
    """rmdir the node's cgroups deepest first; returns those that could not be removed."""
    left = []
    for hierarchy in cgroup_hierarchies():
        parent = hierarchy / node.cgroup_parent.lstrip("/")
        if not parent.exists():
            continue
        for directory in sorted(
            (p for p in parent.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        try:
            parent.rmdir()
        except OSError as error:
            left.append(f"{parent}: {error.strerror}")
    return left


def mounts_under(prefixes: Sequence[Path]) -> list[str]:
    """Mount points below any of `prefixes`, deepest first (the order to unmount them)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].encode().decode("unicode_escape")
        if any(mount_point == str(p) or mount_point.startswith(f"{p}/") for p in prefixes):
            found.append(mount_point)
    return sorted(set(found), key=lambda point: point.count("/"), reverse=True)


def unmount_all(prefixes: Sequence[Path]) -> list[str]:
    """Unmount everything below `prefixes`; lazily where a mount is still busy. Returns what
    is still mounted afterwards."""
    for _ in range(3):
        points = mounts_under(prefixes)
        if not points:
            return []
        for point in points:
            if _run(["umount", point], check=False).returncode != 0:
                _run(["umount", "-l", point], check=False)
    return mounts_under(prefixes)


def delete_network(network: dict[str, Any], nodes: Sequence[dict[str, Any]]) -> list[str]:
    """Remove the namespaces (their veths, bridges, nftables and iptables go with them) and the
    bridge; returns what could not be removed."""
    left = []
    for node in nodes:
        if Path("/run/netns", node["netns"]).exists():
            result = _run(["ip", "netns", "delete", node["netns"]], check=False)
            if result.returncode != 0 and Path("/run/netns", node["netns"]).exists():
                left.append(f"netns {node['netns']}: {result.stderr.strip()}")
        _run(["ip", "link", "delete", node["veth"]], check=False)
    if network and Path("/sys/class/net", network["bridge"]).exists():
        result = _run(["ip", "link", "delete", network["bridge"]], check=False)
        # Gone all the same when another `down` of the same cluster removed it first.
        if result.returncode != 0 and Path("/sys/class/net", network["bridge"]).exists():
            left.append(f"bridge {network['bridge']}: {result.stderr.strip()}")
    return left


# Kept containerd roots: as many as clusters with real nodes usually run at once (the demo and
# the tests'), the least recently used dropped beyond that.
KEPT_IMAGE_STORES = 2


def image_stores_dir() -> Path:
    return paths.cache_root() / "node-image-stores"


def containerd_root(node: RealNode) -> Path:
    return node.directory / "containerd" / "root"


def claim_image_store(node: RealNode) -> bool:
    """Give the node a kept containerd root, most recently used first; False when none is free
    (the node starts with an empty one). Call before its containerd starts."""
    target = containerd_root(node)
    target.parent.mkdir(parents=True, exist_ok=True)
    for store in _by_last_use(image_stores_dir()):
        try:
            store.rename(target)
        except FileNotFoundError:
            continue  # another node took it first
        except OSError:
            return False  # the cache is on another filesystem: no renames
        return True
    return False


def keep_image_store(node: RealNode) -> None:
    """Move the stopped node's containerd root into the pool (nothing may be mounted below
    it); drop the least recently used roots beyond `KEPT_IMAGE_STORES`."""
    root = containerd_root(node)
    if not root.is_dir():
        return
    pool = image_stores_dir()
    pool.mkdir(parents=True, exist_ok=True)
    kept = pool / uuid.uuid4().hex[:12]
    try:
        root.rename(kept)
    except OSError:
        return  # another filesystem: the root goes with the node's directory
    os.utime(kept)
    for stale in _by_last_use(pool)[KEPT_IMAGE_STORES:]:
        shutil.rmtree(stale, ignore_errors=True)


def _by_last_use(pool: Path) -> list[Path]:
    """The kept roots, most recently kept first (taking one can race another node's)."""
    stores = []
    for store in pool.iterdir() if pool.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            stores.append((store.stat().st_mtime, store))
    return [store for _, store in sorted(stores, reverse=True)]


def node_record(node: RealNode) -> dict[str, Any]:
    record = asdict(node)
    record["directory"] = str(node.directory)
    record["sockets"] = str(node.sockets)
    return record


def node_from_record(record: dict[str, Any]) -> RealNode:
    return RealNode(
        **{**record, "directory": Path(record["directory"]), "sockets": Path(record["sockets"])}
    )


def teardown(network: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str]:
    """Undo everything real nodes changed on the host, after their processes were stopped:
    containers (by cgroup), mounts, namespaces, the bridge, cgroups, sockets. Returns the
    leftovers it could not remove (empty when the host is clean)."""
    nodes = [node_from_record(record) for record in records]
    for node in nodes:
        kill_cgroup_processes(node)
    left = unmount_all([p for node in nodes for p in (node.directory, node.sockets)])
    left = [f"mount {point}" for point in left]
    left += delete_network(network, records)
    for node in nodes:
        left += remove_cgroup_parent(node)
        if not left:
            keep_image_store(node)
        shutil.rmtree(node.sockets, ignore_errors=True)
        shutil.rmtree(node.directory, ignore_errors=True)
        containers_log = Path("/var/log/containers")
        if containers_log.is_dir():
            for link in containers_log.iterdir():
                with contextlib.suppress(OSError):
                    if str(link.readlink()).startswith(str(node.directory)):
                        link.unlink()
    return left
