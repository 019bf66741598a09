"""Test sets named by an MLflow artifact URI (`runs:/`, `models:/`, `mlflow-artifacts:/`, `s3://`,
... whatever `mlflow.artifacts.download_artifacts` reads) are fetched to a local file first."""
from __future__ import annotations

import urllib.parse
from pathlib import Path

from tunelens.errors import TunelensError, one_line


def is_artifact_uri(value: str) -> bool:
    """True for `scheme:` URIs other than file:; a bare path (or a Windows drive letter) is local."""
    scheme = urllib.parse.urlparse(value).scheme
    return len(scheme) > 1 and scheme != "file"


def fetch_dataset(value: str, into: Path, tracking_uri: str | None = None) -> str:
    """`value` itself when it is a local path, else the local copy of the artifact it names
    (a `models:/` version looked up on `tracking_uri`'s registry)."""
    if not is_artifact_uri(value):
        return value
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=_version_files_uri(value, tracking_uri), dst_path=str(into),
            tracking_uri=tracking_uri)
    except (MlflowException, OSError) as exc:
        raise TunelensError(f"cannot fetch the test set {value}: {one_line(exc, 300)}") from exc


def _version_files_uri(value: str, tracking_uri: str | None) -> str:
    """`models:/NAME/VERSION/path` (or `@ALIAS`) as the artifact URI of that file among the
    version's files, found on `tracking_uri`'s registry: MLflow itself would look the version up
    on the process's default registry. Other URIs, and LoggedModel ids, are returned as given."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if tracking_uri is None or not ModelsArtifactRepository.is_models_uri(value):
        return value
    model_uri, path = ModelsArtifactRepository.split_models_uri(value)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    found = get_model_name_and_version(client, model_uri)
    if len(found) != 2:
        return value
    root = client.get_model_version_download_uri(*found).rstrip("/")
    return f"{root}/{path}" if path else root
