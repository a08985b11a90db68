"""Build the pinned tools the local control plane needs, from the Go module proxy, into the cache.

Each tool is built once per version into `tools/<name>-<version>/` (see `paths`), verified by asking
the binary for its version, and stamped with the binaries' SHA-256 so later runs skip it in
milliseconds. Kubernetes and etcd are built through small wrapper modules because their own modules
carry `replace` directives that `go install` refuses.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from llama4_operator.devenv import paths

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
# 1.5.1 and later render Ray's token authentication (spec.rayClusterConfig.authOptions); 1.6.1 is
# the newest the Go module proxy serves (it lists v1.7.0 but refuses its zip).
KUBERAY_VERSION = "v1.6.1"
# containerd 2.x answers the kubelet's RuntimeConfig call (Debian's 1.6 does not, and the kubelet's
# fallback for that goes away in 1.37); Debian's runc and CNI plugins run under it.
CONTAINERD_VERSION = "v2.4.2"
CONTAINERD_MODULE = "github.com/containerd/containerd/v2"
# Cluster DNS for the pods of real nodes (Service names: KubeRay's workers find their head so).
COREDNS_VERSION = "v1.15.0"

# Go module holding the KubeRay CRDs and operator, and KWOK's stage definitions.
KUBERAY_MODULE = "github.com/ray-project/kuberay/ray-operator"
KWOK_MODULE = "sigs.k8s.io/kwok"
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


class ToolBootstrapError(RuntimeError):
    """A tool could not be built or verified; the message names the tool and the step."""


@dataclass(frozen=True)
class Tool:
    """One pinned tool: how to build it and how to tell that a build is the right one."""

    name: str
    version: str
    binaries: tuple[str, ...]
    build: Callable[[Tool, GoBuilder], None]
    assets: Callable[[Tool, GoBuilder], None] | None = None
    # How each binary prints its version; `()` means "read the Go build info instead".
    version_args: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def version_command(self, binary: str) -> list[str]:
        args = self.version_args.get(binary, ("--version",))
        if not args:
            return ["go", "version", "-m", str(self.binary(binary))]
        return [str(self.binary(binary)), *args]

    @property
    def home(self) -> Path:
        return paths.tools_dir() / f"{self.name}-{self.version}"

    @property
    def bin_dir(self) -> Path:
        return self.home / "bin"

    def binary(self, name: str | None = None) -> Path:
        return self.bin_dir / (name or self.binaries[0])

    @property
    def stamp(self) -> Path:
        return self.home / "verified.json"

    @property
    def build_log(self) -> Path:
        return self.home / "build.log"


@dataclass
class GoBuilder:
    """Runs `go` with the project's caches and streams its output to a log and a progress bar."""

    progress: Progress
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if shutil.which("go") is None:
            raise ToolBootstrapError(
                "the `go` command is not on PATH: install Go 1.26 or newer, then run again"
            )
        self.env = {
            **os.environ,
            "GOMODCACHE": str(paths.go_module_cache()),
            "GOCACHE": str(paths.go_build_cache()),
            "GOPATH": str(paths.cache_root() / "go" / "path"),
            "CGO_ENABLED": "0",
            "GOFLAGS": "-mod=mod",
            "GOTOOLCHAIN": "local",
        }

    def go(self, args: Sequence[str], *, cwd: Path, log: Path, step: str, total: int = 0) -> str:
        """Run one `go` command; `go build -v` names each package it compiles, which drives the
        progress bar when `total` (the number of packages) is known."""
        task = self.progress.add_task(step, total=total or None)
        output: list[str] = []
        with log.open("a") as sink:
            sink.write(f"$ go {' '.join(args)}\n")
            proc = subprocess.Popen(
                ["go", *args],
                cwd=cwd,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                output.append(line)
                self.progress.update(
                    task, advance=1, description=f"{step} [dim]{line.strip()[:50]}"
                )
            code = proc.wait()
        self.progress.update(task, completed=total or 1, total=total or 1, description=step)
        if code != 0:
            tail = "".join(output[-25:])
            raise ToolBootstrapError(
                f"step failed: {step} (go {' '.join(args[:2])} exited {code}); "
                f"full log: {log}\n{tail}"
            )
        return "".join(output)

    def download(self, module: str, version: str, log: Path) -> dict[str, str]:
        """Download a module into the module cache; `Dir` and `GoMod` say where it lies."""
        out = self.go(
            ["mod", "download", "-json", f"{module}@{version}"],
            cwd=paths.cache_root(),
            log=log,
            step=f"download {module}@{version}",
        )
        info: dict[str, str] = json.loads(out)
        return info


def _version_ldflags(packages: Sequence[str], values: dict[str, str]) -> str:
    return " ".join(f"-X {pkg}.{key}={value}" for pkg in packages for key, value in values.items())


def _go_install(*packages: str, ldflags: str = "") -> Callable[[Tool, GoBuilder], None]:
    def build(tool: Tool, go: GoBuilder) -> None:
        go.env["GOBIN"] = str(tool.bin_dir)
        args = ["install", "-v", "-trimpath", f"-ldflags=-s -w {ldflags}".strip()]
        go.go(
            [*args, *(f"{package}@{tool.version}" for package in packages)],
            cwd=paths.cache_root(),
            log=tool.build_log,
            step=f"{tool.name} {tool.version}: go install",
        )

    return build


def _wrapper_build(
    tool: Tool, go: GoBuilder, go_mod: str, packages: Sequence[str], ldflags: str, main: str = ""
) -> None:
    """Build `packages` from a throwaway module (go.mod given) so its replace lines apply."""
    src = paths.sources_dir() / f"{tool.name}-{tool.version}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(go_mod)
    if main:
        (src / "main.go").write_text(main)
    deps = go.go(
        ["list", "-deps", *packages],
        cwd=src,
        log=tool.build_log,
        step=f"{tool.name} {tool.version}: resolve modules",
    )
    go.go(
        [
            "build",
            "-v",
            "-trimpath",
            f"-ldflags=-s -w {ldflags}",
            "-o",
            f"{tool.bin_dir}/",
            *packages,
        ],
        cwd=src,
        log=tool.build_log,
        step=f"{tool.name} {tool.version}: compile",
        total=len(deps.splitlines()),
    )


def kubernetes_wrapper_go_mod(upstream_go_mod: str, version: str) -> str:
    """go.mod of a module that builds k8s.io/kubernetes `version`.

    The release requires its staging modules at v0.0.0 and replaces them with ./staging/...;
    the published v0.N.P of each is the same code, so each is replaced by that instead.
    """
    staging = sorted(
        {
            line.split()[0]
            for line in upstream_go_mod.splitlines()
            if "=> ./staging/" in line and line.split()[0].startswith("k8s.io/")
        }
    )
    if not staging:
        raise ToolBootstrapError(
            f"no staging modules in k8s.io/kubernetes {version}'s go.mod; is the version right?"
        )
    published = "v0." + version.removeprefix("v1.")
    replaces = "\n".join(f"\t{module} => {module} {published}" for module in staging)
    return (
        f"module llama4.dev/build/kubernetes\n\ngo 1.26.0\n\n"
        f"require k8s.io/kubernetes {version}\n\nreplace (\n{replaces}\n)\n"
    )


def kubernetes_version_ldflags(version: str) -> str:
    """Without these the binaries report v0.0.0-master, which confuses version-checking clients."""
    major, minor, _ = version.removeprefix("v").split(".")
    return _version_ldflags(
        ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"],
        {"gitVersion": version, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"},
    )


def _build_kubernetes(tool: Tool, go: GoBuilder) -> None:
    upstream = Path(go.download("k8s.io/kubernetes", tool.version, tool.build_log)["GoMod"])
    go_mod = kubernetes_wrapper_go_mod(upstream.read_text(), tool.version)
    commands = [f"k8s.io/kubernetes/cmd/{name}" for name in tool.binaries]
    _wrapper_build(tool, go, go_mod, commands, kubernetes_version_ldflags(tool.version))


def _build_etcd(tool: Tool, go: GoBuilder) -> None:
    go_mod = (
        "module llama4.dev/build/etcd\n\ngo 1.26.0\n\n"
        f"require go.etcd.io/etcd/server/v3 {tool.version}\n"
    )
    main = (
        "// Command etcd is the etcd server, built from its published module.\n"
        'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    # `go build -o dir/ .` names the binary after the module path's last element: etcd.
    _wrapper_build(tool, go, go_mod, ["."], "", main=main)


def _kuberay_crds(tool: Tool, go: GoBuilder) -> None:
    source = (
        Path(go.download(KUBERAY_MODULE, tool.version, tool.build_log)["Dir"]) / "config/crd/bases"
    )
    target = tool.home / "crds"
    target.mkdir(parents=True, exist_ok=True)
    for crd in sorted(source.glob("*.yaml")):
        shutil.copyfile(crd, target / crd.name)


def _kwok_stages(tool: Tool, go: GoBuilder) -> None:
    module = Path(go.download(KWOK_MODULE, tool.version, tool.build_log)["Dir"])
    documents = [(module / stage).read_text().strip() for stage in KWOK_STAGES]
    (tool.home / "stages.yaml").write_text("\n---\n".join(documents) + "\n")


TOOLS: tuple[Tool, ...] = (
    Tool("etcd", ETCD_VERSION, ("etcd",), _build_etcd),
    Tool(
        "kubernetes",
        KUBERNETES_VERSION,
        ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"),
        _build_kubernetes,
        version_args={"kubectl": ("version", "--client")},
    ),
    Tool("kwok", KWOK_VERSION, ("kwok",), _go_install(f"{KWOK_MODULE}/cmd/kwok"), _kwok_stages),
    Tool(
        "helm",
        HELM_VERSION,
        ("helm",),
        _go_install(
            "helm.sh/helm/v3/cmd/helm",
            ldflags=_version_ldflags(
                ["helm.sh/helm/v3/internal/version"], {"version": HELM_VERSION}
            ),
        ),
        version_args={"helm": ("version", "--short")},
    ),
    Tool(
        "kuberay",
        KUBERAY_VERSION,
        ("ray-operator",),
        _go_install(KUBERAY_MODULE),
        _kuberay_crds,
        version_args={"ray-operator": ()},  # no version flag: its Go build info says
    ),
    # Real nodes: the kubelet and kube-proxy from the control plane's own release, and a runtime.
    Tool("kubelet", KUBERNETES_VERSION, ("kubelet", "kube-proxy"), _build_kubernetes),
    Tool(
        "containerd",
        CONTAINERD_VERSION,
        ("containerd", "ctr", "containerd-shim-runc-v2"),
        _go_install(
            *(
                f"{CONTAINERD_MODULE}/cmd/{name}"
                for name in ("containerd", "ctr", "containerd-shim-runc-v2")
            ),
            ldflags=_version_ldflags(
                [f"{CONTAINERD_MODULE}/version"], {"Version": CONTAINERD_VERSION}
            ),
        ),
        version_args={"ctr": ("--version",), "containerd-shim-runc-v2": ("-v",)},
    ),
    Tool(
        "coredns",
        COREDNS_VERSION,
        ("coredns",),
        _go_install("github.com/coredns/coredns"),
        version_args={"coredns": ("-version",)},
    ),
)


def tool(name: str) -> Tool:
    for candidate in TOOLS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown tool {name!r}; known: {', '.join(t.name for t in TOOLS)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reported_version(tool: Tool, binary: str) -> str:
    command = tool.version_command(binary)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return result.stdout + result.stderr


def verify(tool: Tool) -> str | None:
    """None when every binary reports the pinned version; otherwise what is wrong."""
    for binary in tool.binaries:
        if not tool.binary(binary).exists():
            return f"{tool.binary(binary)} is missing"
        reported = _reported_version(tool, binary)
        wanted = tool.version.removeprefix("v")
        if wanted not in reported:
            return f"{binary} reports {reported.strip()[:120]!r}, expected version {wanted}"
    return None


def is_current(tool: Tool) -> bool:
    """True when the stamp of an earlier verified build still matches the binaries on disk."""
    try:
        stamp = json.loads(tool.stamp.read_text())
    except (OSError, ValueError):
        return False
    return all(
        tool.binary(binary).exists() and stamp.get(binary) == _sha256(tool.binary(binary))
        for binary in tool.binaries
    )


@contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress


def ensure_tools(names: Sequence[str] = (), console: Console | None = None) -> dict[str, Tool]:
    """Build and verify the named tools (all when none are named), skipping current ones."""
    console = console or Console(stderr=True, log_path=False)
    selected = [tool(name) for name in names] if names else list(TOOLS)
    paths.cache_root().mkdir(parents=True, exist_ok=True)
    # Two test sessions or a demo and a test starting together must not build into (and
    # delete) the same tool home at once: the second waits, then finds the tools current.
    with (paths.cache_root() / ".build.lock").open("w") as lock:
        if not _try_lock(lock):
            console.log("another process is building the tools; waiting for it ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        _ensure(selected, console)
    return {item.name: item for item in selected}


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _ensure(selected: Sequence[Tool], console: Console) -> None:
    for item in selected:
        if is_current(item):
            console.log(f"[green]✓[/] {item.name} {item.version} (cached in {item.home})")
            continue
        console.log(f"building {item.name} {item.version} into {item.home} ...")
        started = time.monotonic()
        shutil.rmtree(item.home, ignore_errors=True)
        item.bin_dir.mkdir(parents=True)
        with _progress(console) as progress:
            builder = GoBuilder(progress)
            item.build(item, builder)
            if item.assets:
                item.assets(item, builder)
        problem = verify(item)
        if problem:
            raise ToolBootstrapError(f"step failed: verify {item.name} {item.version}: {problem}")
        item.stamp.write_text(
            json.dumps({b: _sha256(item.binary(b)) for b in item.binaries}, indent=2)
        )
        console.log(
            f"[green]✓[/] {item.name} {item.version} built and verified "
            f"in {time.monotonic() - started:.0f} s"
        )
