"""Where the local development environment keeps what it builds and runs.

Everything lives outside the repository so that fresh clones, CI runs and the demo share one warm
cache: `$LLAMA4_CACHE_DIR`, else `$XDG_CACHE_HOME/llama4-operator`, else `~/.cache/llama4-operator`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("LLAMA4_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llama4-operator"


def go_module_cache() -> Path:
    return cache_root() / "go" / "mod"


def go_build_cache() -> Path:
    return cache_root() / "go" / "build"


def tools_dir() -> Path:
    """Built tools, one folder per tool and version: `tools/<name>-<version>/`."""
    return cache_root() / "tools"


def sources_dir() -> Path:
    """Wrapper Go modules used to build tools whose own module cannot be `go install`ed."""
    return cache_root() / "src"


def clusters_dir() -> Path:
    """State of local clusters: `clusters/<name>/` holds the kubeconfig, PKI, data and logs."""
    return cache_root() / "clusters"
