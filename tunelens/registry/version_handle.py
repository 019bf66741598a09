"""What `mlflow.pyfunc.load_model` gives for an adapter logged by `tunelens log-adapter`: a handle
that loads nothing.

`mlflow.models.evaluate(model="models:/NAME/V", ...)` loads the model as pyfunc before any
evaluator runs. A transformers pyfunc would put the base and the adapter in memory only for
tunelens to load them again in its own engine (beside the base alone and the alias's holder). So
the MLmodel of a tunelens-logged adapter names this module as its python_function loader, while its
transformers flavor stays for `mlflow.transformers.load_model`: the pyfunc load costs the download
of the adapter's small files, and tunelens's evaluator finds the registered version from the
handle's model id.
"""
from __future__ import annotations

from tunelens.errors import TunelensError

# The python_function flavor's loader_module in a tunelens-logged adapter's MLmodel.
LOADER_MODULE = __name__


class VersionHandle:
    """The pyfunc model of a tunelens-logged adapter: its local files, and no generation."""

    def __init__(self, path: str):
        self.path = path

    def predict(self, data, params=None):
        raise TunelensError(
            "this model loads as a tunelens handle, which generates nothing: compare it with "
            "mlflow.models.evaluate(model=<its URI>, evaluators=['tunelens'], ...), or load the "
            "adapter on its base with mlflow.transformers.load_model(<its URI>)")


def _load_pyfunc(path: str, model_config=None) -> VersionHandle:
    """MLflow's pyfunc loader entry point: nothing but the path is read."""
    return VersionHandle(path)


def flavors(model) -> dict:
    """The flavors in the MLmodel `model` (what MLflow handed an evaluator) was loaded from; {}
    for a model MLflow made from a function or an endpoint."""
    metadata = getattr(model, "metadata", None)
    return dict(getattr(metadata, "flavors", None) or {})


def is_handle(model) -> bool:
    """True when `model` (what mlflow.pyfunc.load_model returned) is such a handle."""
    return flavors(model).get("python_function", {}).get("loader_module") == LOADER_MODULE


def registered_version(client, model_id: str | None) -> str:
    """`models:/NAME/VERSION` of the one registered version made from LoggedModel `model_id`."""
    from tunelens.registry.version import logged_model_id

    found = [v for v in client.search_model_versions(f"source_path = 'models:/{model_id}'")
             if logged_model_id(v) == model_id] if model_id else []
    if len(found) != 1:
        named = ", ".join(f"models:/{v.name}/{v.version}" for v in found) or "no version"
        raise TunelensError(
            f"the model handed to tunelens (LoggedModel {model_id}) is registered as {named}: "
            f"pass model=None and name the version in evaluator_config "
            f"{{'tunelens': {{'model_uri': 'models:/NAME/VERSION'}}}}")
    return f"models:/{found[0].name}/{found[0].version}"
