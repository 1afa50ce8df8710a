"""Integrations with the Hugging Face stack, each loaded only when its library is installed.

peft (integrations/peft.py): PEFT's LoRA layers on NF4Linear, hooked in when peft is imported.
transformers (integrations/transformers.py): `NF4Config`, a quantization_config for `from_pretrained`, and its
HfQuantizer. They are registered with transformers as quant_method "qlora_kernels" when transformers'
quantizer registry (transformers.quantizers.auto) is imported: at once if it already is, else by an import
hook, because importing that registry costs ~8 s here (it imports every quantizer) and `import qlora_kernels`
must stay cheap and must work without transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["install_transformers_hook", "register_transformers"]

_REGISTRY = "transformers.quantizers.auto"


def register_transformers() -> bool:
    """Register NF4Config and its quantizer with transformers (idempotent). False when transformers is missing
    or older than 5 (then NF4Config raises a clear ImportError when used)."""
    try:
        from . import transformers as integration
    except ImportError:  # transformers < 5: NF4Config says so when used; import qlora_kernels still works
        return False
    return integration.register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds transformers.quantizers.auto through the other finders, runs it, then registers ours."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec) if hasattr(self._loader, "create_module") else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        _remove_hook()
        try:
            register_transformers()
        except Exception as exc:  # never break transformers' import: say why ours is not there
            import warnings

            warnings.warn(f"qlora_kernels: NF4Config could not be registered with transformers: {exc!r}")


_HOOK = _RegisterAfterImport()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install_transformers_hook() -> None:
    """Called by `import qlora_kernels`: register now if transformers' registry is loaded, else when it is."""
    if _REGISTRY in sys.modules:
        register_transformers()
    elif importlib.util.find_spec("transformers") is not None and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
