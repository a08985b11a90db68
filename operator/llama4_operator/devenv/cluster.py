"""A real Kubernetes control plane on 127.0.0.1, with KWOK simulating GPU nodes.

etcd, kube-apiserver (RBAC and PodSecurity admission on), kube-controller-manager, kube-scheduler,
the KWOK controller and, optionally, the KubeRay operator run as local processes on free ports.
Everything a cluster owns lives in one state directory (PKI, kubeconfigs, etcd data, logs and a
process table), so `down` from any process can stop it and leave nothing behind. The CLI
(`llama4ctl dev cluster`), the demo and the test fixtures all use this class.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console

from llama4_operator.devenv import images, paths, pki, real_nodes
from llama4_operator.devenv import tools as devtools
from llama4_operator.devenv.nodes import GPU_RESOURCE, SIMULATED_NODE_LABEL, NodePool

LOOPBACK = "127.0.0.1"
SERVICE_CIDR = real_nodes.SERVICE_CIDR
POD_CIDR = "10.244.0.0/16"
# Every component's environment names its cluster's state directory; children inherit it, so
# `down` also finds processes that left their process group (Ray's workers, for one).
CLUSTER_ENV = "LLAMA4_DEVENV_CLUSTER"


class ClusterError(RuntimeError):
    """A component did not start or did not become healthy; the message says which and why."""


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "dev"
    pools: tuple[NodePool, ...] = (NodePool(),)
    kuberay: bool = True
    # Real kubelet nodes (containerd, runc, CNI, kube-proxy) beside the simulated ones.
    real_nodes: int = 0
    real_node_gpus: int = 8
    state_dir: Path | None = None
    start_timeout_s: float = 120.0

    @property
    def directory(self) -> Path:
        return self.state_dir or paths.clusters_dir() / self.name


@dataclass
class Component:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_started_from(pid: int, directory: Path) -> bool:
    """Guard against killing an unrelated process that reused a recorded pid: every component
    runs with the cluster's state directory as its working directory."""
    try:
        return Path(f"/proc/{pid}/cwd").resolve() == directory.resolve()
    except OSError:
        return False


def _kubeconfig(server: str, ca: Path, user: str, pair: pki.KeyPair) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)},
            }
        ],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
        "current-context": user,
    }


Ready = Callable[[], bool]
# Flags the controller-manager and the scheduler share: loopback only, a single instance.
_COMPONENT_FLAGS = (f"--bind-address={LOOPBACK}", "--leader-elect=false", "--profiling=false")


@dataclass(frozen=True)
class Credentials:
    ca: Path
    serving: pki.KeyPair
    service_accounts: pki.KeyPair
    kubeconfigs: dict[str, str]


def _delegated_auth(kubeconfig: str) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
    ]


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


def _component_healthy(port: int) -> bool:
    # Self-signed serving certs; /healthz is readable anonymously by default.
    return httpx.get(f"https://{LOOPBACK}:{port}/healthz", verify=False, timeout=2).text == "ok"


class LocalCluster:
    """One local control plane. Use as a context manager, or `up()` / `down()`."""

    def __init__(self, config: ClusterConfig | None = None, console: Console | None = None):
        self.config = config or ClusterConfig()
        self.console = console or Console(stderr=True, log_path=False)
        self.directory = self.config.directory
        self.kubeconfig = self.directory / "kubeconfig"
        self._state_file = self.directory / "processes.json"
        self._ca: pki.CertificateAuthority | None = None

    # -- state ------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {"processes": {}, "ports": {}}
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        self._state_file.write_text(json.dumps(state, indent=2))

    def running_processes(self) -> dict[str, int]:
        """Recorded components whose processes are still alive."""
        processes: dict[str, int] = self._read_state()["processes"]
        return {
            name: pid
            for name, pid in processes.items()
            if _pid_alive(pid) and _process_started_from(pid, self.directory)
        }

    @property
    def ports(self) -> dict[str, int]:
        ports: dict[str, int] = self._read_state()["ports"]
        return ports

    @property
    def api_address(self) -> str:
        """Where the API server listens: loopback, or the node bridge when real nodes run."""
        address: str = self._read_state().get("api_address", LOOPBACK)
        return address

    @property
    def server(self) -> str:
        return f"https://{self.api_address}:{self.ports['apiserver']}"

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.up()
        return self

    def __exit__(self, *_: object) -> None:
        self.down()

    def up(self) -> None:
        if self.running_processes():
            raise ClusterError(
                f"cluster {self.config.name!r} is already running (state in {self.directory}); "
                "run `llama4ctl dev cluster down` first"
            )
        started = time.monotonic()
        real = self.config.real_nodes > 0
        if real and (missing := real_nodes.missing_host_packages()):
            raise ClusterError(
                f"real nodes need these Debian packages: {', '.join(missing)}; "
                "run `make system-deps` (apt-get install) first"
            )
        tools = devtools.ensure_tools(
            [
                "etcd",
                "kubernetes",
                "kwok",
                *(["kuberay"] if self.config.kuberay else []),
                *(["kubelet", "containerd", "coredns"] if real else []),
            ],
            console=self.console,
        )
        shutil.rmtree(self.directory, ignore_errors=True)
        (self.directory / "logs").mkdir(parents=True)
        state: dict[str, Any] = {"processes": {}, "ports": {}}
        try:
            if real:
                self._create_node_network(state)
            self._start_control_plane(tools, state)
            if self.config.kuberay:
                self._start_kuberay(tools["kuberay"], state)
            self._create_nodes()
            if real:
                self._start_real_nodes(tools, state)
        except BaseException:
            self.console.log("[red]start-up failed; stopping what was started")
            self.down(keep_logs=True)
            raise
        self.console.log(
            f"[green]✓[/] cluster {self.config.name!r} up in {time.monotonic() - started:.0f} s; "
            f"KUBECONFIG={self.kubeconfig}"
        )

    def _start_control_plane(self, tools: dict[str, devtools.Tool], state: dict[str, Any]) -> None:
        ports = state["ports"]
        for name in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler", "kwok"):
            ports[name] = free_port()
        api_address = state.get("api_address", LOOPBACK)
        credentials = self._issue_credentials(f"https://{api_address}:{ports['apiserver']}")
        self._write_state(state)
        kube = tools["kubernetes"]
        for component, ready in (
            self._etcd(tools["etcd"], ports),
            self._apiserver(kube, ports, credentials),
            self._controller_manager(kube, ports, credentials),
            self._scheduler(kube, ports, credentials),
            self._kwok(tools["kwok"], ports, credentials),
        ):
            self._start(state, component, ready)

    def _issue_credentials(self, server: str) -> Credentials:
        """The CA, the API server's serving cert, the service-account key pair, and one client
        certificate and kubeconfig per user (the admin's is `kubeconfig`)."""
        ca = pki.CertificateAuthority(self.directory / "pki")
        self._ca = ca
        api_address = self._read_state().get("api_address", LOOPBACK)
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            hosts=(
                *dict.fromkeys((LOOPBACK, api_address)),
                "localhost",
                "10.96.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
        )
        kubeconfigs = {}
        for user, common_name, groups in (
            ("admin", "llama4-admin", ("system:masters",)),
            ("controller-manager", "system:kube-controller-manager", ()),
            ("scheduler", "system:kube-scheduler", ()),
            ("kwok", "llama4-kwok", ("system:masters",)),
            # The API server's identity towards kubelets (logs, exec, port-forward).
            ("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
        ):
            pair = ca.issue(user, common_name, groups=groups)
            target = self.directory / ("kubeconfig" if user == "admin" else f"{user}.kubeconfig")
            target.write_text(yaml.safe_dump(_kubeconfig(server, ca.cert_path, user, pair)))
            kubeconfigs[user] = str(target)
        return Credentials(ca.cert_path, serving, ca.signing_key("service-accounts"), kubeconfigs)

    def _etcd(self, etcd: devtools.Tool, ports: dict[str, int]) -> tuple[Component, Ready]:
        client_url = f"http://{LOOPBACK}:{ports['etcd']}"
        peer_url = f"http://{LOOPBACK}:{ports['etcd_peer']}"
        command = [
            str(etcd.binary()),
            f"--name={self.config.name}",
            f"--data-dir={self.directory / 'etcd-data'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.config.name}={peer_url}",
            "--unsafe-no-fsync",  # the data is thrown away with the cluster
            "--quota-backend-bytes=8589934592",
            "--log-level=warn",
        ]
        return Component("etcd", command), lambda: _http_ok(f"{client_url}/health")

    def _apiserver(
        self, kube: devtools.Tool, ports: dict[str, int], credentials: Credentials
    ) -> tuple[Component, Ready]:
        address = self._read_state().get("api_address", LOOPBACK)
        if address == LOOPBACK:
            # A loopback advertise address is refused unless endpoints are not reconciled.
            placement = [f"--advertise-address={LOOPBACK}", "--endpoint-reconciler-type=none"]
        else:
            # Pods on real nodes reach the `kubernetes` Service, whose endpoint is this address.
            kubelet_client = self.directory / "pki" / "apiserver-kubelet-client"
            placement = [
                f"--advertise-address={address}",
                f"--kubelet-client-certificate={kubelet_client}.crt",
                f"--kubelet-client-key={kubelet_client}.key",
                f"--kubelet-certificate-authority={credentials.ca}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        command = [
            str(kube.binary("kube-apiserver")),
            f"--etcd-servers=http://{LOOPBACK}:{ports['etcd']}",
            f"--bind-address={address}",
            f"--secure-port={ports['apiserver']}",
            *placement,
            f"--cert-dir={self.directory / 'pki'}",
            f"--tls-cert-file={credentials.serving.cert}",
            f"--tls-private-key-file={credentials.serving.key}",
            f"--client-ca-file={credentials.ca}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",  # PodSecurity is on by default
            "--allow-privileged=true",
            f"--service-account-key-file={credentials.service_accounts.cert}",
            f"--service-account-signing-key-file={credentials.service_accounts.key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--profiling=false",
            "--v=0",
        ]
        return Component("kube-apiserver", command), lambda: self._api_ready("/readyz")

    def _controller_manager(
        self, kube: devtools.Tool, ports: dict[str, int], credentials: Credentials
    ) -> tuple[Component, Ready]:
        port = ports["controller_manager"]
        command = [
            str(kube.binary("kube-controller-manager")),
            *_COMPONENT_FLAGS,
            f"--secure-port={port}",
            f"--cert-dir={self.directory / 'controller-manager-certs'}",
            *_delegated_auth(credentials.kubeconfigs["controller-manager"]),
            f"--service-account-private-key-file={credentials.service_accounts.key}",
            f"--root-ca-file={credentials.ca}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
        ]
        return Component("kube-controller-manager", command), lambda: _component_healthy(port)

    def _scheduler(
        self, kube: devtools.Tool, ports: dict[str, int], credentials: Credentials
    ) -> tuple[Component, Ready]:
        port = ports["scheduler"]
        command = [
            str(kube.binary("kube-scheduler")),
            *_COMPONENT_FLAGS,
            f"--secure-port={port}",
            f"--cert-dir={self.directory / 'scheduler-certs'}",
            *_delegated_auth(credentials.kubeconfigs["scheduler"]),
        ]
        return Component("kube-scheduler", command), lambda: _component_healthy(port)

    @staticmethod
    def _kwok(
        kwok: devtools.Tool, ports: dict[str, int], credentials: Credentials
    ) -> tuple[Component, Ready]:
        address = f"{LOOPBACK}:{ports['kwok']}"
        command = [
            str(kwok.binary()),
            f"--kubeconfig={credentials.kubeconfigs['kwok']}",
            f"--config={kwok.home / 'stages.yaml'}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={POD_CIDR}",
            f"--node-ip={LOOPBACK}",
            "--node-lease-duration-seconds=40",
            f"--server-address={address}",
        ]
        return Component("kwok", command), lambda: _http_ok(f"http://{address}/healthz")

    # -- real nodes ---------------------------------------------------------------------------

    def _create_node_network(self, state: dict[str, Any]) -> None:
        network = real_nodes.node_network(self.directory, real_nodes.host_subnets())
        state["node_network"] = {
            "bridge": network.bridge,
            "subnet": network.subnet,
            "gateway": network.gateway,
            "cluster_id": network.cluster_id,
        }
        state["real_nodes"] = []
        self._write_state(state)  # recorded first, so a failure below is still cleaned up
        real_nodes.create_bridge(network)
        state["api_address"] = network.gateway
        self._write_state(state)
        self.console.log(f"[green]✓[/] node network {network.subnet} on bridge {network.bridge}")

    def _start_cluster_dns(self, coredns: devtools.Tool, state: dict[str, Any]) -> None:
        from kubernetes import utils  # noqa: PLC0415

        address = self.api_address
        # Port 53: resolv.conf (KubeRay's, above) names a server, not a port. The bridge
        # address is the cluster's own, so nothing else listens there.
        port, ready_port = real_nodes.DNS_PORT, free_port()
        state["ports"].update({"coredns": port, "coredns_ready": ready_port})
        config = self.directory / "Corefile"
        config.write_text(
            real_nodes.corefile(
                address=address, port=port, ready_port=ready_port, kubeconfig=self.kubeconfig
            )
        )
        self._start(
            state,
            Component("coredns", [str(coredns.binary()), "-conf", str(config)]),
            ready=lambda: _http_ok(f"http://{address}:{ready_port}/ready"),
        )
        utils.create_from_yaml(
            self.api_client(), yaml_objects=real_nodes.dns_service_manifests(address, port)
        )

    def _start_real_nodes(self, tools: dict[str, devtools.Tool], state: dict[str, Any]) -> None:
        self._start_cluster_dns(tools["coredns"], state)
        network = real_nodes.NodeNetwork(**state["node_network"])
        archives = [images.cached_archive(images.pause_image())]
        archives.append(images.cached_archive(images.shell_image()))
        started: list[real_nodes.RealNode] = []
        for index in range(self.config.real_nodes):
            node = network.node(index, gpus=self.config.real_node_gpus)
            state["real_nodes"].append(real_nodes.node_record(node))
            self._write_state(state)
            real_nodes.create_node_namespace(network, node, started)
            real_nodes.create_cgroup_parent(node)
            self._start_real_node(tools, state, node, archives)
            started.append(node)
        self.wait_for_nodes(len(started), real=True)

    def _start_real_node(
        self,
        tools: dict[str, devtools.Tool],
        state: dict[str, Any],
        node: real_nodes.RealNode,
        archives: Sequence[Path],
    ) -> None:
        assert self._ca is not None
        for directory in (node.directory / "cni", node.directory / "certs", node.sockets):
            directory.mkdir(parents=True, exist_ok=True)
        server = f"https://{self.api_address}:{self.ports['apiserver']}"
        kubeconfigs = {}
        for user, common_name, groups in (
            ("kubelet", f"system:node:{node.name}", ("system:nodes",)),
            ("kube-proxy", "system:kube-proxy", ()),
        ):
            pair = self._ca.issue(f"{node.name}-{user}", common_name, groups=groups)
            path = node.directory / f"{user}.kubeconfig"
            path.write_text(yaml.safe_dump(_kubeconfig(server, self._ca.cert_path, user, pair)))
            kubeconfigs[user] = path
        serving = self._ca.issue(
            f"{node.name}-serving", f"system:node:{node.name}", hosts=(node.address, node.name)
        )
        containerd_bin = tools["containerd"].bin_dir
        config = node.directory / "containerd.toml"
        config.write_text(
            real_nodes.containerd_config(
                node, sandbox_image=images.PAUSE_IMAGE, cni_conf_dir=node.directory / "cni"
            )
        )
        (node.directory / "cni" / "10-llama4.conflist").write_text(
            json.dumps(real_nodes.cni_config(node), indent=2)
        )
        kubelet_config = node.directory / "kubelet.yaml"
        kubelet_config.write_text(
            yaml.safe_dump(
                real_nodes.kubelet_config(
                    node, ca=self._ca.cert_path, serving_cert=serving.cert, serving_key=serving.key
                )
            )
        )
        proxy_config = node.directory / "kube-proxy.yaml"
        proxy_config.write_text(
            yaml.safe_dump(real_nodes.kube_proxy_config(node, kubeconfigs["kube-proxy"]))
        )
        search_path = f"{containerd_bin}:/usr/sbin:/usr/bin:/sbin:/bin"
        ctr = [str(containerd_bin / "ctr"), f"--address={node.containerd_socket}"]
        if real_nodes.claim_image_store(node):
            self.console.log(f"{node.name}: images kept from an earlier node")
        self._start(
            state,
            Component(
                f"{node.name}-containerd",
                node.enter([str(containerd_bin / "containerd"), f"--config={config}"]),
                env={"PATH": search_path},
            ),
            ready=lambda: (
                subprocess.run([*ctr, "version"], capture_output=True, check=False).returncode == 0
            ),
        )
        for archive in archives:
            self._import_image(node, archive)
        labels = ",".join(f"{key}={value}" for key, value in node.labels().items())
        self._start(
            state,
            Component(
                f"{node.name}-kubelet",
                node.enter(
                    [
                        str(tools["kubelet"].binary("kubelet")),
                        f"--config={kubelet_config}",
                        f"--kubeconfig={kubeconfigs['kubelet']}",
                        f"--hostname-override={node.name}",
                        f"--node-ip={node.address}",
                        f"--root-dir={node.directory / 'kubelet'}",
                        f"--cert-dir={node.directory / 'certs'}",
                        f"--node-labels={labels}",
                    ]
                ),
                env={"PATH": search_path},
            ),
            ready=lambda: _http_ok(
                f"http://{node.address}:{real_nodes.KUBELET_HEALTHZ_PORT}/healthz"
            ),
        )
        self._advertise_gpus(node)
        self._start(
            state,
            Component(
                f"{node.name}-kube-proxy",
                node.enter(
                    [str(tools["kubelet"].binary("kube-proxy")), f"--config={proxy_config}"]
                ),
                env={"PATH": search_path},
            ),
            ready=lambda: _http_ok(
                f"http://{node.address}:{real_nodes.KUBE_PROXY_HEALTHZ_PORT}/livez"
            ),
        )

    def real_node_names(self) -> list[str]:
        return [str(record["name"]) for record in self._read_state().get("real_nodes", [])]

    def load_image(self, archive: Path) -> None:
        """Import an image archive into every real node's containerd (where the kubelet finds
        it: pods use `imagePullPolicy: Never` or `IfNotPresent`, nothing is pulled)."""
        for record in self._read_state().get("real_nodes", []):
            node = real_nodes.node_from_record(record)
            with self.console.status(f"loading {archive.name} into {node.name} ..."):
                self._import_image(node, archive)

    @staticmethod
    def _import_image(node: real_nodes.RealNode, archive: Path) -> None:
        """Import unless the node holds the image already (a kept image store), then drop the
        node's other tags of the same repository (earlier builds)."""
        image = images.archived_image(archive)
        ctr = [
            str(devtools.tool("containerd").binary("ctr")),
            f"--address={node.containerd_socket}",
            "--namespace=k8s.io",
            "images",
        ]

        def run(*args: str) -> str:
            result = subprocess.run([*ctr, *args], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ClusterError(f"loading {archive.name} into {node.name}: {result.stderr}")
            return result.stdout

        held = dict(line.split()[:3:2] for line in run("ls").splitlines()[1:] if line.strip())
        if held.get(image.name) != image.digest:
            run("import", str(archive))
        repository = image.name.rsplit(":", 1)[0]
        older = [name for name in held if name.rsplit(":", 1)[0] == repository]
        older = [name for name in older if name != image.name]
        if older:
            run("rm", *older)

    def _advertise_gpus(self, node: real_nodes.RealNode) -> None:
        """Set the node's `nvidia.com/gpu` capacity once the kubelet has registered it (the
        kubelet keeps an extended resource it does not manage itself)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        with self._admin_http() as client:
            while True:
                response = client.patch(
                    f"/api/v1/nodes/{node.name}/status",
                    json=real_nodes.gpu_status_patch(node),
                    headers={"Content-Type": "application/strategic-merge-patch+json"},
                )
                if response.status_code == 200:
                    return
                if response.status_code != 404 or time.monotonic() > deadline:
                    raise ClusterError(
                        f"could not advertise GPUs on {node.name}: {response.status_code} "
                        f"{response.text[:300]}"
                    )
                time.sleep(0.5)

    def _start_kuberay(self, kuberay: devtools.Tool, state: dict[str, Any]) -> None:
        from kubernetes import utils  # noqa: PLC0415  (the client is only needed once up)

        api = self.api_client()
        for crd in sorted((kuberay.home / "crds").glob("*.yaml")):
            utils.create_from_yaml(api, str(crd))
        metrics, probe = free_port(), free_port()
        state["ports"].update({"kuberay_metrics": metrics, "kuberay_probe": probe})
        command = [
            str(kuberay.binary()),
            f"--metrics-addr={LOOPBACK}:{metrics}",
            f"--health-probe-bind-address={LOOPBACK}:{probe}",
            "--enable-leader-election=false",
            "--log-stdout-encoder=console",
            f"--kubeconfig={self.kubeconfig}",
        ]
        if "node_network" in state:
            # KubeRay asks each Ray head for its Serve status at the head Service's cluster
            # name, so with real nodes it resolves names through the cluster's DNS.
            command = self.with_cluster_dns(command)
        self._start(
            state,
            Component("kuberay-operator", command),
            ready=lambda: _http_ok(f"http://{LOOPBACK}:{probe}/readyz"),
        )

    def with_cluster_dns(self, command: Sequence[str]) -> list[str]:
        """`command` resolving names through the cluster's CoreDNS (real nodes only): its own
        mount namespace sees a resolv.conf naming it; the host's stays as it is."""
        gateway = self._read_state().get("node_network", {}).get("gateway")
        if gateway is None:
            raise ClusterError(f"cluster {self.config.name!r} has no real nodes, so no DNS")
        resolv = self.directory / "cluster-resolv.conf"
        resolv.write_text(real_nodes.resolv_conf(gateway))
        return real_nodes.with_resolv_conf(resolv, command)

    def start_component(self, component: Component, ready: Ready, port: int | None = None) -> None:
        """Run one more process as part of the cluster (the demo's operator, say), so that
        `down` stops it with the rest."""
        state = self._read_state()
        if port is not None:
            state["ports"][component.name] = port
        self._start(state, component, ready)

    def restart_component(self, name: str, ready: Ready | None = None) -> None:
        """Stop one running component (SIGKILL, as a crash) and start it again with the same
        command, ports and state; `ready` defaults to the API server answering /readyz (what
        every component needs to work again). Used by the reliability tests."""
        state = self._read_state()
        recorded = state.get("commands", {}).get(name)
        pid = self.running_processes().get(name)
        if recorded is None or pid is None:
            raise ClusterError(f"{name} is not a running component of cluster {self.config.name!r}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        while _group_alive(pid):
            time.sleep(0.05)
        component = Component(name, list(recorded["command"]), dict(recorded["env"]))
        self._start(state, component, ready or (lambda: self._api_ready("/readyz")))

    def _start(self, state: dict[str, Any], component: Component, ready: Ready) -> None:
        log_path = self.directory / "logs" / f"{component.name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                component.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **component.env, CLUSTER_ENV: str(self.directory)},
                cwd=self.directory,
                start_new_session=True,  # its own process group: `down` stops its children too
            )
        state["processes"][component.name] = process.pid
        # Kept so that `restart_component` can run the same command again.
        state.setdefault("commands", {})[component.name] = {
            "command": component.command,
            "env": component.env,
        }
        self._write_state(state)
        with self.console.status(f"starting {component.name} ..."):
            deadline = time.monotonic() + self.config.start_timeout_s
            while True:
                if process.poll() is not None:
                    raise ClusterError(
                        f"{component.name} exited with code {process.returncode} during start-up; "
                        f"last log lines ({log_path}):\n{_tail(log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError, OSError):
                    if ready():
                        break
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"{component.name} not healthy after {self.config.start_timeout_s:.0f} s; "
                        f"last log lines ({log_path}):\n{_tail(log_path)}"
                    )
                time.sleep(0.2)
        self.console.log(f"[green]✓[/] {component.name} (pid {process.pid})")

    def _admin_http(self) -> httpx.Client:
        pki_dir = self.directory / "pki"
        tls = ssl.create_default_context(cafile=pki_dir / "ca.crt")
        tls.load_cert_chain(pki_dir / "admin.crt", pki_dir / "admin.key")
        return httpx.Client(base_url=self.server, verify=tls, timeout=5)

    def _api_ready(self, path: str) -> bool:
        with self._admin_http() as client:
            return client.get(path).status_code == 200

    def api_client(self) -> Any:
        """A `kubernetes` ApiClient authenticated as the cluster admin."""
        from kubernetes import config  # noqa: PLC0415

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def _create_nodes(self) -> None:
        from kubernetes import client  # noqa: PLC0415

        from llama4_operator.devenv.nodes import node_manifests  # noqa: PLC0415

        manifests = [node for pool in self.config.pools for node in node_manifests(pool)]
        if not manifests:
            return
        core = client.CoreV1Api(self.api_client())
        with (
            self.console.status(f"creating {len(manifests)} simulated GPU nodes ..."),
            ThreadPoolExecutor(max_workers=8) as pool,
        ):
            list(pool.map(core.create_node, manifests))
        self.wait_for_nodes(len(manifests))

    def wait_for_nodes(self, expected: int, *, real: bool = False) -> None:
        """Until `expected` simulated (or real) nodes are Ready; real ones also advertise GPUs."""
        kind = "real" if real else "simulated"
        deadline = time.monotonic() + max(self.config.start_timeout_s, expected * 0.2)
        with self.console.status(f"waiting for {expected} {kind} nodes to be Ready ...") as status:
            while True:
                ready = sum(
                    n["ready"] and (n["gpus"] > 0 or not real) for n in self.nodes(real=real)
                )
                status.update(f"waiting for {kind} nodes to be Ready: {ready}/{expected}")
                if ready >= expected:
                    break
                if time.monotonic() > deadline:
                    logs = self.directory / "logs"
                    raise ClusterError(
                        f"only {ready} of {expected} {kind} nodes became Ready"
                        + (" with GPUs; see the kubelet logs in " if real else "; see ")
                        + str(logs if real else logs / "kwok.log")
                    )
                time.sleep(0.5)
        what = "real node(s) Ready (kubelet, containerd)" if real else "simulated GPU nodes Ready"
        self.console.log(f"[green]✓[/] {expected} {what}")

    def wait_established(self, crds: Sequence[str], timeout_s: float = 60) -> None:
        """Poll until each CRD (plural.group) serves its kind: a CRD just created has no
        conditions yet, so `kubectl wait` would fail outright instead of waiting."""
        deadline = time.monotonic() + timeout_s
        with self._admin_http() as client:
            for crd in crds:
                while not self._established(client, crd):
                    if time.monotonic() > deadline:
                        raise ClusterError(f"the CRD {crd} is not Established after {timeout_s} s")
                    time.sleep(0.25)

    @staticmethod
    def _established(client: httpx.Client, crd: str) -> bool:
        response = client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
        if response.status_code == 404:
            return False
        response.raise_for_status()
        conditions = (response.json().get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    def nodes(self, *, real: bool = False) -> list[dict[str, Any]]:
        """Simulated (or, with `real`, real) nodes with readiness and allocatable GPUs."""
        label = real_nodes.REAL_NODE_LABEL if real else SIMULATED_NODE_LABEL
        with self._admin_http() as client:
            response = client.get("/api/v1/nodes", params={"labelSelector": f"{label}=true"})
            response.raise_for_status()
        result = []
        for item in response.json()["items"]:
            conditions = item.get("status", {}).get("conditions") or []
            result.append(
                {
                    "name": item["metadata"]["name"],
                    "labels": item["metadata"].get("labels", {}),
                    "ready": any(
                        c["type"] == "Ready" and c["status"] == "True" for c in conditions
                    ),
                    "gpus": int(item["status"].get("allocatable", {}).get(GPU_RESOURCE, "0")),
                }
            )
        return result

    def down(self, keep_logs: bool = False) -> None:
        """Stop every recorded process (process groups, newest first) and free the state."""
        state = self._read_state()
        ours = {
            name: pid
            for name, pid in state["processes"].items()
            if _pid_alive(pid) and _process_started_from(pid, self.directory)
        }
        _stop_groups(list(ours.values()))
        strays = _stop_marked(self.directory)
        if ours:
            self.console.log(f"stopped {', '.join(ours)}")
        if strays:
            self.console.log(f"stopped {len(strays)} more processes of the cluster: {strays}")
        if "node_network" in state:
            left = real_nodes.teardown(state["node_network"], state.get("real_nodes", []))
            if left:
                raise ClusterError(f"real nodes left these behind: {'; '.join(left)}")
            self.console.log("removed the real nodes' containers, mounts, namespaces and bridge")
        for owned in state.get("directories", []):
            shutil.rmtree(owned, ignore_errors=True)
        leftover = [port for port in state["ports"].values() if port_is_bound(port)]
        if leftover:
            time.sleep(1)  # sockets of just-stopped processes can take a moment to close
            leftover = [port for port in leftover if port_is_bound(port)]
        if leftover:
            raise ClusterError(f"ports still bound after stopping the cluster: {leftover}")
        if keep_logs:
            shutil.rmtree(self.directory / "etcd-data", ignore_errors=True)
            self._state_file.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)

    def track(
        self, ports: Mapping[str, int] | None = None, directories: Sequence[Path] = ()
    ) -> None:
        """Record more ports that `down` checks are freed, and directories outside the state
        directory that `down` deletes (Ray's temporary directory, say)."""
        state = self._read_state()
        state["ports"].update(ports or {})
        state.setdefault("directories", []).extend(str(path) for path in directories)
        self._write_state(state)

    def status(self) -> dict[str, Any]:
        running = self.running_processes()
        recorded = self._read_state()["processes"]
        return {
            "name": self.config.name,
            "directory": str(self.directory),
            "kubeconfig": str(self.kubeconfig) if self.kubeconfig.exists() else None,
            "components": {name: name in running for name in recorded},
            "ports": self.ports,
        }


def _stop_groups(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM every process group at once, then SIGKILL what outlives the grace period."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_group_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        time.sleep(0.05)


def _processes_marked(directory: Path) -> list[int]:
    """Live processes (other than this one) whose environment names this cluster."""
    marker = f"{CLUSTER_ENV}={directory}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if marker in environment:
            found.append(int(entry.name))
    return found


def _stop_marked(directory: Path, grace_s: float = 5.0, kill_wait_s: float = 10.0) -> list[int]:
    """SIGTERM the cluster's processes outside the recorded groups, SIGKILL what outlives the
    grace period; returns their pids. A process that SIGKILL does not end within `kill_wait_s`
    (stuck in the kernel) is left rather than waited on forever."""
    strays = _processes_marked(directory)
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    give_up = deadline + kill_wait_s
    while alive := [pid for pid in strays if _pid_alive(pid) and not _is_zombie(pid)]:
        if time.monotonic() > give_up:
            break
        if time.monotonic() > deadline:
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    return strays


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    # Reap the leader first when it is our child: a zombie still answers killpg.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
