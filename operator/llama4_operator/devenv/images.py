"""Container images made on this machine, without Docker or a registry.

No base image can be pulled here, so the images the real nodes need are written as OCI image
archives directly: the sandbox ("pause") image from Kubernetes' own `pause.c` compiled statically,
and a shell image from Debian's static busybox for tests and debugging. Each archive is cached under
`images/` by the SHA-256 of what went into it, and loaded into a node's containerd with
`ctr images import`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llama4_operator.devenv import paths
from llama4_operator.devenv import tools as devtools

PAUSE_IMAGE = "llama4.dev/pause:3.10"
SHELL_IMAGE = "llama4.dev/busybox:local"
BUSYBOX = Path("/usr/bin/busybox")
# Applets the shell image links to busybox (the image has no other binaries).
BUSYBOX_APPLETS = (
    "sh",
    "cat",
    "echo",
    "env",
    "hostname",
    "httpd",
    "ls",
    "mkdir",
    "nc",
    "sleep",
    "wget",
)


class ImageBuildError(RuntimeError):
    """An image could not be made; the message says which and what to install."""


@dataclass(frozen=True)
class LayerFile:
    """One entry of an image layer: a regular file (with `source`) or a symlink (`link`)."""

    path: str
    source: Path | None = None
    link: str = ""
    mode: int = 0o755


@dataclass(frozen=True)
class ImageSpec:
    name: str
    files: tuple[LayerFile, ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    directories: tuple[str, ...] = ()


def _layer(files: Sequence[LayerFile], extra_directories: Sequence[str] = ()) -> bytes:
    """A reproducible tar layer: fixed mtimes and owners, sorted entries, parent dirs first."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted(
            {str(parent) for f in files for parent in Path(f.path).parents if str(parent) != "/"}
            | set(extra_directories)
        )
        for directory in directories:
            info = tarfile.TarInfo(directory.lstrip("/") + "/")
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "/tmp" else 0o755
            tar.addfile(info)
        for entry in sorted(files, key=lambda f: f.path):
            info = tarfile.TarInfo(entry.path.lstrip("/"))
            info.mode = entry.mode
            if entry.link:
                info.type, info.linkname = tarfile.SYMTYPE, entry.link
                tar.addfile(info)
                continue
            assert entry.source is not None
            data = entry.source.read_bytes()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest, len(data)


def oci_archive(spec: ImageSpec) -> bytes:
    """The image as an OCI image-layout tarball that `ctr images import` names `spec.name`."""
    blobs: dict[str, bytes] = {}
    layer = _layer(spec.files, spec.directories)
    compressed = gzip.compress(layer, mtime=0)
    layer_digest, layer_size = _blob(blobs, compressed)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": list(spec.entrypoint) or None,
            "Cmd": list(spec.cmd) or None,
            "Env": [f"{key}={value}" for key, value in spec.env.items()],
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    config_digest, config_size = _blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer_size,
            }
        ],
    }
    manifest_digest, manifest_size = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": spec.name,
                    "org.opencontainers.image.ref.name": spec.name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    members = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
        **{f"blobs/sha256/{d.removeprefix('sha256:')}": data for d, data in blobs.items()},
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def images_dir() -> Path:
    return paths.cache_root() / "images"


def cached_archive(spec: ImageSpec) -> Path:
    """Write the archive once per content: the file name carries a hash of its inputs."""
    key = hashlib.sha256(spec.name.encode())
    for entry in spec.files:
        key.update(f"{entry.path}\0{entry.link}\0{entry.mode}".encode())
        if entry.source is not None:
            key.update(hashlib.sha256(entry.source.read_bytes()).digest())
    key.update(json.dumps([spec.entrypoint, spec.cmd, dict(spec.env), spec.directories]).encode())
    slug = spec.name.replace("/", "_").replace(":", "_")
    target = images_dir() / f"{slug}-{key.hexdigest()[:16]}.tar"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(oci_archive(spec))
        partial.rename(target)
    return target


def pause_binary() -> Path:
    """Kubernetes' `pause` (the process that holds a pod's namespaces), compiled statically from
    the release the control plane is built from; cached by the source's hash."""
    kubernetes = devtools.tool("kubernetes")
    source = (
        paths.go_module_cache() / f"k8s.io/kubernetes@{kubernetes.version}/build/pause/linux"
    ) / "pause.c"
    if not source.exists():
        raise ImageBuildError(
            f"{source} is missing: run `llama4ctl dev tools kubernetes` first (it downloads the "
            "Kubernetes module that holds pause.c)"
        )
    if shutil.which("gcc") is None:
        raise ImageBuildError("gcc is needed to build the pause image: apt-get install gcc")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = images_dir() / f"pause-{digest}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        version = kubernetes.version
        result = subprocess.run(
            ["gcc", "-Os", "-static", f'-DVERSION="{version}"', "-o", f"{target}.partial", source],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ImageBuildError(
                f"compiling {source} failed (install libc6-dev for a static libc):\n"
                f"{result.stderr[-2000:]}"
            )
        Path(f"{target}.partial").rename(target)
    return target


def pause_image() -> ImageSpec:
    return ImageSpec(PAUSE_IMAGE, (LayerFile("/pause", pause_binary()),), entrypoint=("/pause",))


def shell_image() -> ImageSpec:
    if not BUSYBOX.exists():
        raise ImageBuildError(
            f"{BUSYBOX} is missing: apt-get install busybox-static (see `make system-deps`)"
        )
    links = tuple(LayerFile(f"/bin/{applet}", link="busybox") for applet in BUSYBOX_APPLETS)
    return ImageSpec(
        SHELL_IMAGE,
        (LayerFile("/bin/busybox", BUSYBOX), *links),
        cmd=("/bin/sh",),
        env={"PATH": "/bin"},
        directories=("/tmp",),
    )
