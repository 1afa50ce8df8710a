"""What the installed package says was built, read without importing the compiled code, so a test tells
"nothing was built" (a skip) from "built but does not load" (a failure).

A build installs qlora_kernels/_C*.so and qlora_kernels/_C_build_info.json (csrc/_C_build_info.json.in) beside
the Python modules; the package itself falls back to the reference kernels when _C does not import, so only the
tests can notice that a build went missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PACKAGE_DIR = Path(importlib.util.find_spec("qlora_kernels").origin).parent
BUILD_INFO = PACKAGE_DIR / "_C_build_info.json"


def built_native_files() -> list[str]:
    """Names of the native build's files installed in the package folder (empty: nothing was built)."""
    found = [p.name for p in PACKAGE_DIR.iterdir() if p.name.startswith("_C.") and p.suffix in (".so", ".pyd")]
    return sorted(found) + ([BUILD_INFO.name] if BUILD_INFO.is_file() else [])


def native_or_skip():
    """qlora_kernels._C. Skips (the whole module when called at import) only when nothing was built; fails
    when a build is installed but the extension does not import."""
    try:
        import qlora_kernels._C as C
    except ImportError as exc:
        built = built_native_files()
        if built:
            pytest.fail(f"qlora_kernels._C was built ({', '.join(built)} in {PACKAGE_DIR}) but does not import: {exc}",
                        pytrace=False)
        pytest.skip(f"qlora_kernels._C was not built (no _C module or {BUILD_INFO.name} in {PACKAGE_DIR})",
                    allow_module_level=True)
    return C
