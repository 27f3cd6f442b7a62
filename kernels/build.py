"""Compile C kernel sources once per machine into a shared-library cache.

A library is named by a hash of its source, compiler and flags, so editing either rebuilds it
and concurrent processes that race to build the same library each write a private temporary
file and atomically rename it into place (the loser's rename just replaces identical bytes).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

CSRC_DIR = Path(__file__).parent / "csrc"


class BuildError(RuntimeError):
    """The compiler is missing or rejected the source."""


def cache_dir() -> Path:
    """Where compiled kernels live: $TANDEM_CACHE/kernels, else ~/.cache/tandem/kernels."""
    root = os.environ.get("TANDEM_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "tandem"
    return base / "kernels"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports in /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"; "" where
    there is none)."""
    return _cpuinfo_field("vendor_id").strip()


def _cpuinfo_field(name: str) -> str:
    """The first value of a field of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value
    except OSError:
        pass
    return ""


def load_extension(name: str, path: Path) -> ModuleType:
    """The CPython extension module `name` in the shared library at `path` (as
    build_shared_library returns it), loaded without going through sys.path."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def build_shared_library(source: Path, flags: Sequence[str], compiler: str = "gcc") -> Path:
    """Return the path of `source` compiled with `flags` into a shared library, building it
    into the cache on first use. Raises BuildError if the compiler is missing or fails."""
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise BuildError(f"C compiler {compiler!r} not found on PATH")
    target = cache_dir() / f"{source.stem}-{_build_digest(source, compiler_path, flags)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".so")
    os.close(fd)
    try:
        command = [compiler_path, *flags, "-shared", "-fPIC", "-o", partial, str(source)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{result.stderr}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _build_digest(source: Path, compiler_path: str, flags: Sequence[str]) -> str:
    digest = hashlib.sha256(source.read_bytes())
    digest.update("\0".join([compiler_path, *flags]).encode())
    return digest.hexdigest()[:16]
