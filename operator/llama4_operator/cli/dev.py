"""`llama4ctl dev ...`: the local development environment (tools, control plane, demo)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence

import click
from rich.console import Console
from rich.table import Table

from llama4_operator.devenv import images
from llama4_operator.devenv import tools as devtools
from llama4_operator.devenv.cluster import ClusterConfig, ClusterError, LocalCluster
from llama4_operator.devenv.demo import DemoError, PlacementDemo, ServingDemo
from llama4_operator.devenv.nodes import (
    GPU_MODELS,
    GPU_PRODUCT_LABEL,
    NODE_POOL_LABEL,
    NVLINK_DOMAIN_LABEL,
    ZONE_LABEL,
    NodePool,
    parse_pool,
)

console = Console(stderr=True, log_path=False)

name_option = click.option(
    "--name", default="dev", show_default=True, help="Cluster name (state in the cache)."
)


def _pools(pool_specs: Sequence[str], nodes: int, gpus_per_node: int, gpu: str) -> list[NodePool]:
    if pool_specs:
        try:
            return [parse_pool(spec, index) for index, spec in enumerate(pool_specs)]
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--pool") from error
    return [NodePool(count=nodes, gpus_per_node=gpus_per_node, gpu=gpu)]


def _cluster(
    name: str, pools: Sequence[NodePool] = (), kuberay: bool = True, real_nodes: int = 0
) -> LocalCluster:
    config = ClusterConfig(name=name, pools=tuple(pools), kuberay=kuberay, real_nodes=real_nodes)
    return LocalCluster(config, console)


@click.group()
def dev() -> None:
    """Local development environment: pinned tools, a real control plane, the demo."""


@dev.command("tools")
@click.argument("names", nargs=-1, type=click.Choice([t.name for t in devtools.TOOLS]))
def tools_command(names: tuple[str, ...]) -> None:
    """Build (or reuse) the pinned tools: etcd, Kubernetes (kubectl, kubelet, kube-proxy), KWOK,
    Helm, KubeRay, containerd.

    With NAMES, only those. Builds go to ~/.cache/llama4-operator (or $LLAMA4_CACHE_DIR),
    keyed by version; a verified build is reused.
    """
    try:
        built = devtools.ensure_tools(names, console=console)
    except devtools.ToolBootstrapError as error:
        raise click.ClickException(str(error)) from error
    for item in built.values():
        click.echo(f"{item.name}\t{item.version}\t{item.bin_dir}")


IMAGE_BUILDERS = {"operator": images.operator_image, "ray": images.ray_image}


@dev.command("images")
@click.argument("names", nargs=-1, type=click.Choice(sorted(IMAGE_BUILDERS)))
@click.option(
    "--load",
    "load_into",
    metavar="CLUSTER",
    help="Also import them into the real nodes of this running local cluster.",
)
def images_command(names: tuple[str, ...], load_into: str | None) -> None:
    """Build (or reuse) the project's images without Docker: the operator image and the Ray
    image (Ray, the serving package, vLLM's CPU build), from Debian's packages and PyPI.

    With NAMES, only those. The same images build from images/*.Containerfile with Docker or
    Podman. Archives are cached under ~/.cache/llama4-operator/images by the content of their
    sources; prints each image's name and archive.
    """
    local = _cluster(load_into) if load_into else None
    if local is not None and not local.real_node_names():
        raise click.ClickException(
            f"cluster {load_into!r} has no real nodes: start it with `--real-nodes 1`"
        )
    for image_name in names or sorted(IMAGE_BUILDERS):

        def progress(step: str, image: str = image_name) -> None:
            console.log(f"{image}: {step}")

        try:
            built = IMAGE_BUILDERS[image_name](progress=progress)
            if local is not None:
                local.load_image(built.archive)
        except (images.ImageBuildError, ClusterError) as error:
            raise click.ClickException(str(error)) from error
        click.echo(f"{built.name}\t{built.archive}")


@dev.group()
def cluster() -> None:
    """A real control plane with simulated GPU nodes (KWOK) and, optionally, real kubelet nodes."""


@cluster.command("up")
@name_option
@click.option("--nodes", default=16, show_default=True, help="Simulated GPU nodes (one pool).")
@click.option("--gpus-per-node", default=8, show_default=True)
@click.option("--gpu", type=click.Choice(sorted(GPU_MODELS)), default="h100", show_default=True)
@click.option(
    "--pool",
    "pool_specs",
    multiple=True,
    metavar="[NAME=]GPU:COUNTxGPUS[,zones=Z][,nvlink=N]",
    help="A node pool (repeatable); replaces --nodes/--gpus-per-node/--gpu. E.g. h100:16x8.",
)
@click.option("--kuberay/--no-kuberay", default=True, show_default=True, help="Run KubeRay.")
@click.option(
    "--real-nodes",
    type=click.IntRange(0, 8),
    default=0,
    show_default=True,
    help="Real kubelet nodes (containerd, runc, CNI, kube-proxy), each in its own network "
    "namespace, advertising 8 GPUs; pods scheduled there run. Needs `make system-deps`.",
)
def cluster_up(
    name: str,
    nodes: int,
    gpus_per_node: int,
    gpu: str,
    pool_specs: tuple[str, ...],
    kuberay: bool,
    real_nodes: int,
) -> None:
    """Start the control plane and create the GPU nodes; leaves it running."""
    local = _cluster(name, _pools(pool_specs, nodes, gpus_per_node, gpu), kuberay, real_nodes)
    try:
        local.up()
    except (ClusterError, devtools.ToolBootstrapError) as error:
        raise click.ClickException(str(error)) from error
    _print_env(local)


@cluster.command("down")
@name_option
def cluster_down(name: str) -> None:
    """Stop every process of the cluster and delete its state."""
    try:
        _cluster(name).down()
    except ClusterError as error:
        raise click.ClickException(str(error)) from error


@cluster.command("status")
@name_option
def cluster_status(name: str) -> None:
    """Show the cluster's components, ports and simulated GPU nodes."""
    local = _cluster(name)
    status = local.status()
    if not status["components"]:
        raise click.ClickException(f"cluster {name!r} is not running")
    table = Table("component", "running", "port", title=f"cluster {name}")
    for component, running in status["components"].items():
        port = status["ports"].get(_PORT_OF.get(component, component), "")
        table.add_row(component, "yes" if running else "[red]no", str(port))
    console.print(table)
    _print_nodes(local)
    _print_env(local)


_PORT_OF = {
    "kube-apiserver": "apiserver",
    "kube-controller-manager": "controller_manager",
    "kube-scheduler": "scheduler",
    "kuberay-operator": "kuberay_probe",
}


@dev.command("env")
@name_option
def env_command(name: str) -> None:
    """Print shell exports (PATH to the tools, KUBECONFIG): eval "$(llama4ctl dev env)"."""
    local = _cluster(name)
    bins = ":".join(str(t.bin_dir) for t in devtools.TOOLS)
    click.echo(f"export PATH={bins}:$PATH")
    click.echo(f"export KUBECONFIG={local.kubeconfig}")


@dev.command("kubectl", context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def kubectl_command(name: str, args: tuple[str, ...]) -> None:
    """Run the pinned kubectl against the local cluster: llama4ctl dev kubectl get nodes."""
    local = _cluster(name)
    kubectl = devtools.tool("kubernetes").binary("kubectl")
    os.execve(kubectl, [str(kubectl), *args], {**os.environ, "KUBECONFIG": str(local.kubeconfig)})


@dev.command("demo")
@name_option
@click.option("--detach", is_flag=True, help="Leave it running; stop with `make demo-down`.")
@click.option(
    "--load-seconds",
    type=click.FloatRange(min=0),
    default=45,
    show_default=True,
    help="How long to drive load on the endpoint (0: none).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Concurrent clients while driving load.",
)
@click.option(
    "--placement-only",
    is_flag=True,
    help="The model-free demo instead: Scout and Maverick placed on 16 simulated 8-GPU nodes "
    "through KubeRay (no Ray cluster, no model, no Prometheus).",
)
@click.option(
    "--mode",
    type=click.Choice(["rayservice", "external"]),
    default="rayservice",
    show_default=True,
    help="rayservice: the operator renders a RayService and KubeRay runs the Ray pods on the "
    "real node (the mode users run). external: the operator deploys to a local Ray cluster "
    "(host processes with fake GPUs) through its dashboard.",
)
@click.option(
    "--real-nodes",
    type=click.IntRange(0, 1),
    default=1,
    show_default=True,
    help="Real kubelet nodes; the operator runs there as Helm-installed pods. 0 (external "
    "mode only): no real node, the operator runs as a local process.",
)
def demo_command(
    name: str,
    detach: bool,
    load_seconds: float,
    concurrency: int,
    placement_only: bool,
    mode: str,
    real_nodes: int,
) -> None:
    """The local demo: a real control plane with 4 simulated 8-GPU H100 nodes (KWOK), a real
    kubelet node and KubeRay; Prometheus; the operator, built into an image here and installed
    by Helm onto the real node; and a tiny Llama 4 on vLLM (CPU build) in a RayService whose
    Ray pods run on the real node from the Ray image built here. Prints the OpenAI endpoint
    (the deployment's Service) with curl and openai examples, asks it one question, drives load
    and shows placement and scaling as they happen.

    Runs in the foreground until Ctrl-C, then stops everything (or --detach; then
    `make demo-down`).
    """
    if mode == "rayservice" and not real_nodes and not placement_only:
        raise click.BadParameter(
            "RayService mode runs the Ray pods on a real node: keep --real-nodes 1, or use "
            "--mode external",
            param_hint="--real-nodes",
        )
    local = _cluster(
        name,
        [NodePool()] if placement_only else [NodePool(count=4)],
        real_nodes=0 if placement_only else real_nodes,
    )
    if local.running_processes():
        raise click.ClickException(
            f"the demo's cluster {name!r} is already running; stop it first with "
            f"`make demo-down` (llama4ctl dev cluster down --name {name})"
        )
    # SIGTERM stops the demo the way Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    try:
        local.up()
        _print_nodes(local)
        if placement_only:
            placement = PlacementDemo(local, console)
            placement.start()
            placement.show(placement.wait_until_placed())
        else:
            serving = ServingDemo(
                local,
                console,
                load_seconds=load_seconds,
                concurrency=concurrency,
                mode="rayservice" if mode == "rayservice" else "external",
            )
            endpoints = serving.start()
            serving.show_endpoint(endpoints)
            console.log(f"first answer {time.monotonic() - started:.0f} s after start")
            if load_seconds:
                serving.drive_load(endpoints)
            serving.show_monitoring(endpoints)
    except KeyboardInterrupt:
        console.print("[bold]Interrupted: stopping everything the demo started ...")
        local.down()
        raise SystemExit(130) from None
    except (ClusterError, DemoError, devtools.ToolBootstrapError) as error:
        raise click.ClickException(
            f"{error}\n(logs in {local.directory / 'logs'}; stop it with: make demo-down)"
        ) from error
    _print_env(local)
    if detach:
        console.print("[bold]Left running; `make demo-down` stops everything.")
        return
    console.print("[bold]Running; press Ctrl-C to stop everything.")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        console.print("[bold]Stopping everything the demo started ...")
    finally:
        local.down()


def _print_nodes(local: LocalCluster) -> None:
    table = Table(
        "node",
        "kind",
        "ready",
        "gpus",
        "product",
        "pool",
        "nvlink domain",
        "zone",
        title="GPU nodes",
    )
    nodes = [(node, "real") for node in local.nodes(real=True)]
    nodes += [(node, "simulated") for node in local.nodes()]
    for node, kind in nodes:
        labels = node["labels"]
        table.add_row(
            node["name"],
            kind,
            "Ready" if node["ready"] else "[red]NotReady",
            str(node["gpus"]),
            labels.get(GPU_PRODUCT_LABEL, ""),
            labels.get(NODE_POOL_LABEL, ""),
            labels.get(NVLINK_DOMAIN_LABEL, ""),
            labels.get(ZONE_LABEL, ""),
        )
    console.print(table)


def _print_env(local: LocalCluster) -> None:
    console.print(
        f"\nexport KUBECONFIG={local.kubeconfig}\n"
        f'# or: llama4ctl dev kubectl get nodes   |   eval "$(llama4ctl dev env)"'
    )
