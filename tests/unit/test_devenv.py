"""The local environment's pure parts: node pools, the Kubernetes wrapper module, tool stamps,
and the certificates the control plane trusts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from llama4_operator.api.models import Llama4DeploymentSpec
from llama4_operator.devenv import images, pki, real_nodes, tools
from llama4_operator.devenv.demo import WEIGHTS_CLAIM, on_real_node, tiny_manifest, weights_volume
from llama4_operator.devenv.local_prometheus import ScrapeTargets, prometheus_config
from llama4_operator.devenv.nodes import (
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    NVLINK_DOMAIN_LABEL,
    ZONE_LABEL,
    NodePool,
    node_manifests,
    parse_pool,
)
from llama4_operator.renderers.children import MODELS_MOUNT_PATH

UPSTREAM_GO_MOD = """module k8s.io/kubernetes

go 1.26.0

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/example/other => github.com/example/other v1.2.3
)
"""


def test_parse_pool_reads_every_part() -> None:
    pool = parse_pool("big=b200:4x8,zones=1,nvlink=2")
    assert pool == NodePool(
        name="big", count=4, gpus_per_node=8, gpu="b200", zones=1, nodes_per_nvlink_domain=2
    )
    assert parse_pool("h100:16x8", index=3).name == "pool-3"


@pytest.mark.parametrize("spec", ["h100", "h100:16", "h100:x8", "tpu:4x8", "H100:4x8"])
def test_parse_pool_rejects_malformed_specs_with_the_expected_form(spec: str) -> None:
    with pytest.raises(ValueError, match=r"GPU:COUNTxGPUS|unknown gpu"):
        parse_pool(spec)


def test_node_manifests_label_gpus_zones_and_nvlink_domains() -> None:
    nodes = node_manifests(
        NodePool(name="p", count=8, gpus_per_node=4, gpu="h200", zones=2, nodes_per_nvlink_domain=2)
    )
    assert [n["metadata"]["name"] for n in nodes][:2] == ["gpu-p-0000", "gpu-p-0001"]
    labels = [n["metadata"]["labels"] for n in nodes]
    assert [lab[ZONE_LABEL] for lab in labels] == ["zone-a"] * 4 + ["zone-b"] * 4
    assert [lab[NVLINK_DOMAIN_LABEL] for lab in labels] == [f"p-nvl-{i // 2:04d}" for i in range(8)]
    assert {lab[GPU_PRODUCT_LABEL] for lab in labels} == {"NVIDIA-H200"}
    assert {lab[GPU_MEMORY_LABEL] for lab in labels} == {"143771"}
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_a_zone_never_splits_an_nvlink_domain() -> None:
    nodes = node_manifests(NodePool(count=72, zones=4, nodes_per_nvlink_domain=18))
    zones_of_domain: dict[str, set[str]] = {}
    for node in nodes:
        labels = node["metadata"]["labels"]
        zones_of_domain.setdefault(labels[NVLINK_DOMAIN_LABEL], set()).add(labels[ZONE_LABEL])
    assert len(zones_of_domain) == 4
    assert all(len(zones) == 1 for zones in zones_of_domain.values())


def test_wrapper_go_mod_replaces_each_staging_module_with_its_published_version() -> None:
    go_mod = tools.kubernetes_wrapper_go_mod(UPSTREAM_GO_MOD, "v1.36.3")
    assert "require k8s.io/kubernetes v1.36.3" in go_mod
    assert "\tk8s.io/api => k8s.io/api v0.36.3" in go_mod
    assert "\tk8s.io/client-go => k8s.io/client-go v0.36.3" in go_mod
    assert "github.com/example/other" not in go_mod


def test_wrapper_go_mod_refuses_a_go_mod_without_staging_modules() -> None:
    with pytest.raises(tools.ToolBootstrapError, match="no staging modules"):
        tools.kubernetes_wrapper_go_mod("module k8s.io/kubernetes\n", "v1.36.3")


def test_version_ldflags_set_the_real_version_in_both_packages() -> None:
    flags = tools.kubernetes_version_ldflags("v1.36.3")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.36.3" in flags
        assert f"-X {package}.gitMinor=36" in flags


@pytest.fixture
def fake_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tools.Tool:
    monkeypatch.setenv("LLAMA4_CACHE_DIR", str(tmp_path))
    tool = tools.Tool("fake", "v1.2.3", ("fake",), build=lambda _tool, _go: None)
    tool.bin_dir.mkdir(parents=True)
    return tool


def _script(path: Path, output: str) -> None:
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_verify_accepts_the_pinned_version_and_names_a_wrong_one(fake_tool: tools.Tool) -> None:
    _script(fake_tool.binary(), "fake version v1.2.3")
    assert tools.verify(fake_tool) is None
    _script(fake_tool.binary(), "fake version v1.2.4")
    problem = tools.verify(fake_tool)
    assert problem is not None
    assert "expected version 1.2.3" in problem


def test_verify_reports_a_missing_binary(fake_tool: tools.Tool) -> None:
    assert "missing" in (tools.verify(fake_tool) or "")


def test_stamp_goes_stale_when_a_binary_changes(fake_tool: tools.Tool) -> None:
    _script(fake_tool.binary(), "v1.2.3")
    assert not tools.is_current(fake_tool)
    fake_tool.stamp.write_text(json.dumps({"fake": tools._sha256(fake_tool.binary())}))
    assert tools.is_current(fake_tool)
    _script(fake_tool.binary(), "v1.2.3 rebuilt")
    assert not tools.is_current(fake_tool)


def test_every_pinned_tool_has_a_way_to_tell_its_version() -> None:
    for tool in tools.TOOLS:
        for binary in tool.binaries:
            command = tool.version_command(binary)
            assert command[0] in {str(tool.binary(binary)), "go"}


def test_client_certificates_carry_user_and_groups(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority(tmp_path)
    pair = ca.issue("admin", "llama4-admin", groups=("system:masters",))
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "llama4-admin"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "system:masters"
    )
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert pair.key.stat().st_mode & 0o077 == 0


def test_serving_certificates_name_ip_and_dns_hosts(tmp_path: Path) -> None:
    pair = pki.CertificateAuthority(tmp_path).issue(
        "apiserver", "kube-apiserver", hosts=("127.0.0.1", "kubernetes")
    )
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["kubernetes"]


def test_a_ray_dashboard_asking_for_a_token_stops_the_start_with_the_fix() -> None:
    import httpx

    from llama4_operator.devenv.local_ray import RayAuthenticationError, refuse_unauthenticated

    refuse_unauthenticated(httpx.Response(200))  # answered: nothing to say
    refuse_unauthenticated(httpx.Response(503))  # not up yet: the caller waits
    with pytest.raises(RayAuthenticationError, match=r"401.*token authentication is on.*ray stop"):
        refuse_unauthenticated(
            httpx.Response(401, text="Unauthorized: Missing authentication token")
        )


def test_every_ray_the_dev_environment_starts_says_its_authentication_mode() -> None:
    from llama4_operator.devenv.local_ray import RAY_ENV

    assert RAY_ENV["RAY_AUTH_MODE"] == "disabled"


def test_cluster_dns_wrapper_bind_mounts_a_resolv_conf_naming_coredns(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(real_nodes.resolv_conf("10.250.3.1"))
    assert resolv.read_text().splitlines()[0] == "nameserver 10.250.3.1"
    assert "search svc.cluster.local cluster.local" in resolv.read_text()
    command = real_nodes.with_resolv_conf(resolv, ["kuberay", "--flag=x"])
    # The mount is private to the command's own mount namespace; the command runs as given.
    assert command[:4] == ["unshare", "--mount", "--propagation=private", "--"]
    script = command[command.index("-c") + 1]
    assert 'mount --bind "$0" /etc/resolv.conf' in script
    assert command[-3:] == [str(resolv), "kuberay", "--flag=x"]


def test_prometheus_finds_ray_pods_through_the_metrics_services_dns_names() -> None:
    targets = ScrapeTargets(
        operator=Path("/tmp/operator-targets.json"),
        namespace="llama4-demo",
        ray_pod_dns_names=("tiny-metrics.llama4-demo.svc.cluster.local",),
    )
    jobs = {job["job_name"]: job for job in prometheus_config(targets, [])["scrape_configs"]}
    [discovery] = jobs["ray"]["dns_sd_configs"]
    assert discovery == {
        "names": ["tiny-metrics.llama4-demo.svc.cluster.local"],
        "type": "A",
        "port": 8080,
        "refresh_interval": "10s",
    }
    assert jobs["llama4-operator"]["file_sd_configs"] == [{"files": ["/tmp/operator-targets.json"]}]


def test_the_demo_pins_its_ray_pods_to_the_real_node_and_reads_weights_from_a_claim(
    tmp_path: Path,
) -> None:
    manifest = on_real_node(tiny_manifest(tmp_path / "model", vocab_size=300))
    spec = Llama4DeploymentSpec.model_validate(manifest["spec"])
    assert spec.model.weights.volume_claim_name == WEIGHTS_CLAIM
    assert spec.model.weights.uri == MODELS_MOUNT_PATH
    assert spec.resources.node_selector == {real_nodes.REAL_NODE_LABEL: "true"}
    volume, claim = weights_volume(tmp_path / "model", "llama4-demo")
    assert volume["spec"]["hostPath"] == {"path": str(tmp_path / "model"), "type": "Directory"}
    assert volume["spec"]["claimRef"] == {"namespace": "llama4-demo", "name": WEIGHTS_CLAIM}
    assert claim["metadata"] == {"name": WEIGHTS_CLAIM, "namespace": "llama4-demo"}
    assert claim["spec"]["volumeName"] == volume["metadata"]["name"]
    assert volume["spec"]["accessModes"] == claim["spec"]["accessModes"] == ["ReadOnlyMany"]


def _node(tmp_path: Path, index: int) -> real_nodes.RealNode:
    network = real_nodes.NodeNetwork("abc123", "l4babc123", "10.250.7.0/24", "10.250.7.1")
    node = network.node(index, gpus=1)
    return dataclasses.replace(node, directory=tmp_path / "nodes" / f"node-{index}")


def test_a_stopped_nodes_images_go_to_the_next_node_and_never_to_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA4_CACHE_DIR", str(tmp_path / "cache"))
    first, second, third = (_node(tmp_path, i) for i in range(3))
    assert not real_nodes.claim_image_store(first)  # nothing kept yet: an empty root
    blob = real_nodes.containerd_root(first) / "io.containerd.content.v1.content" / "blob"
    blob.parent.mkdir(parents=True)
    blob.write_text("layer")
    real_nodes.keep_image_store(first)
    assert not real_nodes.containerd_root(first).exists()

    assert real_nodes.claim_image_store(second)
    assert (real_nodes.containerd_root(second) / blob.relative_to(blob.parents[1])).read_text()
    assert not real_nodes.claim_image_store(third), "one kept root goes to one node"


def test_only_the_most_recently_kept_image_stores_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA4_CACHE_DIR", str(tmp_path / "cache"))
    nodes = [_node(tmp_path, i) for i in range(real_nodes.KEPT_IMAGE_STORES + 1)]
    for age, node in enumerate(nodes):
        root = real_nodes.containerd_root(node)
        root.mkdir(parents=True)
        (root / "built").write_text(str(age))
        real_nodes.keep_image_store(node)
        for store in real_nodes.image_stores_dir().iterdir():  # older ones older on the clock
            os.utime(store, (store.stat().st_atime - 10, store.stat().st_mtime - 10))
    kept = sorted((p / "built").read_text() for p in real_nodes.image_stores_dir().iterdir())
    assert kept == [str(age) for age in range(1, real_nodes.KEPT_IMAGE_STORES + 1)]
    newest = _node(tmp_path, 9)
    assert real_nodes.claim_image_store(newest)
    assert (real_nodes.containerd_root(newest) / "built").read_text() == str(len(nodes) - 1)


def test_an_image_archive_names_its_image_and_manifest(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    archive = tmp_path / "image.tar"
    images.write_oci_archive(archive, "llama4.dev/hello:1", [layer], images.ImageConfig())
    found = images.archived_image(archive)
    assert found.name == "llama4.dev/hello:1"
    with tarfile.open(archive) as tar:
        blob = tar.extractfile(f"blobs/sha256/{found.digest.removeprefix('sha256:')}")
        assert blob is not None
        manifest = json.load(blob)
    assert (
        manifest["layers"][0]["digest"]
        == "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    )
