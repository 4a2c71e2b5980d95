"""Builds the native CPU kernels: `python -m fedjax_core.models.native.build`.

Compiles every `src/*.cc` of this package into `lib/libfedjax_native.so` with cmake and the
C++ compiler, against jaxlib's XLA FFI headers (`jax.ffi.include_dir()`) and oneDNN from
the `onednn` / `onednn-devel` wheels (`pip install -e '.[native]'`; another prefix with
`include/oneapi/dnnl` and `lib/libdnnl.so.3` through `DNNL_ROOT=...`). `make run` and
`make test` call it. The build is optional: when cmake, a compiler or oneDNN is missing,
or the compile fails, it prints one line saying so and that the pure-JAX path is used, and
exits 0 (exit 1 only with `--strict`). It rebuilds only when a source is newer than the
library. The library is written to a temporary name and renamed into place, so a failed
build never leaves a half-written one.

Example:
  $ python -m fedjax_core.models.native.build
  fedjax-sim: native CPU kernels built (fedjax_core/models/native/lib/libfedjax_native.so)
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedjax_core.models.native import LIBRARY, PACKAGE_DIR


def dnnl_root() -> Path | None:
    """The prefix holding oneDNN's headers and library, or None when there is none.

    `DNNL_ROOT` when set, else this Python's prefix (where the `onednn` wheels put them).

    Returns:
      A `Path` with `include/oneapi/dnnl/dnnl.hpp` and `lib/libdnnl.so.3`, or None.

    Example:
      >>> dnnl_root()  # doctest: +SKIP
      PosixPath('/work/main/.venv')
    """
    root = Path(os.environ.get("DNNL_ROOT") or sys.prefix)
    if (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (
            root / "lib" / "libdnnl.so.3").exists():
        return root
    return None


def sources() -> list[Path]:
    """The files the library is built from: `CMakeLists.txt` and `src/*`."""
    return [PACKAGE_DIR / "CMakeLists.txt", *sorted((PACKAGE_DIR / "src").iterdir())]


def up_to_date() -> bool:
    """Whether the library exists and is newer than every source and than oneDNN itself."""
    if not LIBRARY.is_file():
        return False
    built = LIBRARY.stat().st_mtime
    root = dnnl_root()
    inputs = sources() + ([root / "lib" / "libdnnl.so.3"] if root is not None else [])
    return all(path.stat().st_mtime <= built for path in inputs)


def missing_tools() -> str | None:
    """Why the library cannot be built here (a missing tool or oneDNN), or None."""
    if shutil.which("cmake") is None:
        return "no cmake on PATH"
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX") or "c++", "g++", "clang++")):
        return "no C++ compiler on PATH"
    if dnnl_root() is None:
        return "oneDNN is not installed (pip install -e '.[native]')"
    return None


def build(verbose: bool = False) -> tuple[bool, str]:
    """Compiles the library when it is missing or older than its sources.

    Args:
      verbose: show cmake's and the compiler's output.

    Returns:
      `(ok, message)`: whether a current library now exists, and one line saying what
      happened (or why it could not be built).

    Example:
      >>> ok, message = build()  # doctest: +SKIP
    """
    if up_to_date():
        return True, f"native CPU kernels up to date ({_shown(LIBRARY)})"
    reason = missing_tools()
    if reason is not None:
        return False, f"native CPU kernels not built ({reason}); using the pure-JAX path"
    import jax  # noqa: PLC0415  (only a build needs the FFI headers)

    root = dnnl_root()
    LIBRARY.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=PACKAGE_DIR) as tmp:
        out_dir = Path(tmp) / "out"
        configure = ["cmake", "-S", str(PACKAGE_DIR), "-B", str(Path(tmp) / "cmake"),
                     "-DCMAKE_BUILD_TYPE=Release",
                     f"-DXLA_FFI_INCLUDE_DIR={jax.ffi.include_dir()}",
                     f"-DDNNL_ROOT={root}", f"-DFEDJAX_NATIVE_OUT={out_dir}"]
        compile_ = ["cmake", "--build", str(Path(tmp) / "cmake"), "-j", str(os.cpu_count() or 1)]
        log = Path(tmp) / "build.log"
        with log.open("w") as sink:
            for command in (configure, compile_):
                result = subprocess.run(command, stdout=None if verbose else sink,
                                        stderr=subprocess.STDOUT if not verbose else None,
                                        check=False)
                if result.returncode != 0:
                    kept = PACKAGE_DIR / "lib" / "build.log"
                    shutil.copyfile(log, kept)
                    return False, (f"native CPU kernels not built (the compile failed; see "
                                   f"{_shown(kept)}); using the pure-JAX path")
        built = out_dir / LIBRARY.name
        staged = LIBRARY.with_name(LIBRARY.name + ".tmp")
        shutil.copyfile(built, staged)
        os.replace(staged, LIBRARY)
    return True, f"native CPU kernels built ({_shown(LIBRARY)})"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """The command line: build, print one line, exit 0 (or 1 with `--strict` on failure)."""
    parser = argparse.ArgumentParser(description=(__doc__ or '').strip().splitlines()[0])
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when the library cannot be built (CI)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    ok, message = build(verbose=args.verbose)
    print(f"fedjax-sim: {message}", flush=True)
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
