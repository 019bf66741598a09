"""tunelens: see how a LoRA fine-tune changed the weights, and whether it beats its base, in MLflow."""

__version__ = "0.1.0"

# Heavy helpers load on first use (module __getattr__) so `import tunelens` stays light.
_LAZY = {"log_adapter": "tunelens.registry_hooks.service.log_adapter"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunelens' has no attribute {name!r}")
