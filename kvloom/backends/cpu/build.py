"""Building kvloom's CPU kernels (cpu_kernels.c beside this file): standard library only, so that the CLI
can start the compile before it imports torch.

`pip install` builds it (setup.py, build_for_install) beside the source, so that no start pays the build
(about 5 s of one core at -O3; -O2 builds in half the time but runs the linear layers 3x slower: they
rely on complete unrolling of their register tiles). Where that build is missing or was made for another
source, compiler or CPU, the first start builds it into $KVLOOM_CACHE_DIR (default ~/.cache/kvloom).
Either file is named by a hash of the source, the compiler command and the CPU's flags (-march=native).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from kvloom.logger import init_logger

logger = init_logger(__name__)

_SOURCE = Path(__file__).parent / "cpu_kernels.c"
_REQUIRED_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}


def cache_dir() -> Path:
    return Path(os.environ.get("KVLOOM_CACHE_DIR") or Path.home() / ".cache" / "kvloom")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _unsupported() -> str | None:
    """Why the kernels cannot run here, or None."""
    if os.environ.get("KVLOOM_CPU_KERNELS", "1") == "0":
        return "KVLOOM_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"they are written for x86-64, this is {platform.machine()}"
    missing = _REQUIRED_FLAGS - _cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return None


def _command() -> tuple[list[str], Path]:
    """(compiler command without the file names, the cached .so it makes)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    what = _SOURCE.read_bytes() + " ".join(cmd).encode() + " ".join(sorted(_cpu_flags())).encode()
    return cmd, cache_dir() / f"kvloom_cpu_{hashlib.sha256(what).hexdigest()[:16]}.so"


def _built(target: Path | None = None) -> Path | None:
    """The .so for this source, compiler and CPU (target: _command()'s, when the caller has it): pip
    install's beside the source, else the cache's."""
    target = target or _command()[1]
    for path in (_SOURCE.parent / target.name, target):
        if path.exists():
            return path
    return None


def _compile(cmd: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first starts never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([*cmd, str(_SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, target)


def _build() -> Path:
    cmd, target = _command()
    built = _built(target)
    if built is not None:
        return built
    _compile(cmd, target)
    logger.info("Built CPU kernels: %s", target)
    return target


def build_for_install(dest: Path) -> Path | None:
    """pip install's build (setup.py): the .so into `dest`, the installed kvloom/backends/cpu/ folder, where
    _built() looks first. Never fails the install: where the kernels cannot run or the compiler fails, it
    says why and kvloom runs on PyTorch ops (or builds on a later start, once a compiler is there)."""
    why = _unsupported()
    if why is not None:
        logger.warning("Not building the CPU kernels: %s", why)
        return None
    try:
        cmd, target = _command()
        _compile(cmd, dest / target.name)
    except (RuntimeError, OSError) as e:
        logger.warning("Not building the CPU kernels: %s", e)
        return None
    logger.info("Built CPU kernels: %s", dest / target.name)
    return dest / target.name


_background_build: threading.Thread | None = None


def prebuild_cpu_kernels() -> None:
    """Start compiling the kernels in a background thread (the compiler runs as its own process) when they
    are not built yet, so that a first start overlaps the compile with imports, the tokenizer conversion
    and the weight loading; load_cpu_kernels() waits for it. Does nothing where the kernels cannot run or
    are built already."""
    global _background_build
    if _background_build is not None or _unsupported() is not None:
        return
    try:
        if _built() is not None:
            return
    except (RuntimeError, OSError):
        return  # load_cpu_kernels() reports it

    def build() -> None:
        try:
            _build()
        except (RuntimeError, OSError):
            pass  # load_cpu_kernels() builds again and reports the error

    _background_build = threading.Thread(target=build, name="kvloom-kernel-build", daemon=True)
    _background_build.start()


def wait_for_prebuild() -> None:
    if _background_build is not None:
        _background_build.join()
