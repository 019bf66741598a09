"""What one analysis leaves in MLflow: a run (metrics, params, artifacts, table) and version tags.

The run lives in experiment hooks.experiment (default `tunelens-analysis`), tagged
tunelens.model_name / tunelens.model_version. The per-layer profile is logged as stepped metrics
(step = layer index) so MLflow's own charts draw it. The version gets the summary tags and a
short markdown section in its description pointing to the run's report.

tunelens writes the description only between its own markers (`replace_section`): the user's
text around them is kept as it is, and any tunelens section (the analysis, an evaluation) can be
replaced on its own. The markers are markdown link-reference definitions, which every markdown
renderer (MLflow's UI included) shows as nothing.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from .base_resolution import BaseModelResolution
from tunelens.registry_hooks.report.narrative import narrate
from tunelens.registry_hooks.report.outputs import AnalysisFiles
from tunelens.registry_hooks.engine.result import AnalysisResult

MODEL_NAME_TAG = "tunelens.model_name"
MODEL_VERSION_TAG = "tunelens.model_version"
ARTIFACT_DIR = "tunelens"
TABLE_FILE = "tunelens/modules.json"
DESCRIPTION_HEADING = "### tunelens analysis"
ANALYSIS_SECTION = "analysis"
_MAX_PARAM = 6000
_MAX_DESCRIPTION = 5000  # the registry's description column


def experiment_id(client: MlflowClient, name: str) -> str:
    """The named experiment's id (the analysis's, the evaluation's), created on first use (two
    workers racing both get it)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def analysis_runs(client: MlflowClient, experiment: str, name: str, version: str) -> list:
    """Every live run in the analysis experiment made for this version."""
    runs = client.search_runs([experiment], f"tags.`{MODEL_VERSION_TAG}` = '{version}'",
                              max_results=1000)
    return [r for r in runs if r.data.tags.get(MODEL_NAME_TAG) == name]


def top_layer(result: AnalysisResult) -> int | None:
    """The layer with the largest S_ℓ = Σ‖ΔW‖_F over its modules."""
    finite = [p for p in result.layers if math.isfinite(p.fro_sum)]
    return max(finite, key=lambda p: p.fro_sum).layer if finite else None


def _metrics(result: AnalysisResult, now_ms: int) -> list[Metric]:
    summary = result.summary
    scalars = {"trainable_params": summary.trainable_params,
               "layers_modified": len(summary.layers_modified),
               "mean_delta_fro": summary.mean_delta_fro,
               "max_delta_fro": summary.max_delta_fro,
               "mean_rank_utilisation": summary.mean_rank_utilisation,
               "trainable_share": summary.trainable_share,
               "modules_analysed": len(result.modules)}
    scalars.update({f"group_fro.{g}": v for g, v in summary.group_fro.items()})
    metrics = [Metric(k, float(v), now_ms, 0) for k, v in scalars.items()
               if v is not None and math.isfinite(float(v))]
    for profile in result.layers:
        stepped = {"layer_fro_sum": profile.fro_sum}
        stepped.update({f"layer_fro.{g}": v for g, v in profile.groups.items()})
        stepped.update({f"layer_fro.{c}": v for c, v in profile.components.items()})
        metrics += [Metric(k, float(v), now_ms, profile.layer) for k, v in stepped.items()
                    if v is not None and math.isfinite(float(v))]
    return metrics


def _params(result: AnalysisResult, base: BaseModelResolution) -> list[Param]:
    adapter = {k: v for k, v in vars(result.adapter).items() if v not in (None, {}, [])}
    adapter["base_model_path"] = str(base.path) if base.path else "none (adapter-only analysis)"
    adapter["base_model_source"] = base.source
    return [Param(k, (v if isinstance(v, str) else json.dumps(v, default=str))[:_MAX_PARAM])
            for k, v in adapter.items()]


def module_table(result: AnalysisResult) -> dict[str, list]:
    """One row per analysed module: the per-module table shown by MLflow's table view."""
    columns = ["name", "layer", "component", "group", "kind", "rank", "scale", "fro", "spectral",
               "effective_rank", "stable_rank", "rank_utilisation", "relative_fro",
               "intruder_dimensions"]
    table = {c: [] for c in columns}
    for module in result.modules:
        for c in columns:
            value = getattr(module, c)
            table[c].append(None if isinstance(value, float) and not math.isfinite(value)
                            else value)
    table["shape"] = ["x".join(map(str, m.shape)) for m in result.modules]
    return table


def log_analysis_run(client: MlflowClient, experiment: str, name: str, version: str,
                     result: AnalysisResult, files: AnalysisFiles, base: BaseModelResolution,
                     attempt: int) -> str:
    """Create and fill the version's analysis run; returns its id."""
    run = client.create_run(experiment, run_name=f"{name} v{version}", tags={
        MODEL_NAME_TAG: name, MODEL_VERSION_TAG: str(version),
        "tunelens.analysis.attempt": str(attempt), "mlflow.note.content":
            f"tunelens weight analysis of registered model `{name}` version {version}."})
    run_id = run.info.run_id
    try:
        now_ms = int(time.time() * 1000)
        params = _params(result, base)
        metrics = _metrics(result, now_ms)
        for start in range(0, len(params), 100):  # log_batch's limits: 100 params, 1000 metrics
            client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        client.set_tag(run_id, "tunelens.base_model_source", base.source)
        client.log_artifacts(run_id, str(Path(files.json_path).parent), ARTIFACT_DIR)
        client.log_table(run_id, module_table(result), TABLE_FILE)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.delete_run(run_id)
        raise
    return run_id


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#])")


def escape_markdown(text: str) -> str:
    """`text` shown literally by a markdown renderer (‖ΔW‖_F must not open an italic)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def description_section(result: AnalysisResult, experiment: str, run_id: str,
                        base: BaseModelResolution) -> str:
    """A short markdown summary of the analysis, linking to the run's report."""
    summary = result.summary
    layer = top_layer(result)
    base_text = f"`{base.path}`" if base.path else "not found, adapter-only analysis"
    lines = [DESCRIPTION_HEADING, "",
             f"- trainable parameters: **{summary.trainable_params:,}**"
             + (f" ({summary.trainable_share:.3%} of the base)" if summary.trainable_share else ""),
             f"- layers modified: **{len(summary.layers_modified)}**"
             + (f" of {summary.num_layers}" if summary.num_layers else "")
             + (f"; most changed: layer **{layer}**" if layer is not None else ""),
             f"- mean per-layer {escape_markdown('‖ΔW‖_F (S_ℓ, summed over its matrices)')}: "
             f"**{summary.mean_delta_fro:.4g}**",
             f"- base model: {base_text}"]
    lines += [f"- {escape_markdown(line)}" for line in narrate(result)[:3]]
    lines += ["", f"Report: [run {run_id[:8]}](#/experiments/{experiment}/runs/{run_id}), "
                  f"artifact `{ARTIFACT_DIR}/report.html`."]
    return "\n".join(lines)


def _marker(key: str, end: str) -> str:
    return f"[//]: # (tunelens:{key}:{end})"


def replace_section(description: str | None, key: str, text: str | None) -> str:
    """`description` with tunelens's section `key` set to `text` (None removes it): only the
    part between the section's markers changes; a new section goes at the end. The whole stays
    within the registry's 5000 characters by shortening the section, never the user's text."""
    description = description or ""
    start, end = _marker(key, "start"), _marker(key, "end")
    if start in description and end in description.split(start, 1)[1]:
        before, rest = description.split(start, 1)
        after = rest.split(end, 1)[1]
    elif key == ANALYSIS_SECTION and DESCRIPTION_HEADING in description:
        # written before the markers existed: the analysis section ran to the end of the text
        before, after = description.split(DESCRIPTION_HEADING, 1)[0], ""
    else:
        before, after = description, ""
    before, after = before.rstrip(), after.strip()
    if text is None:
        return "\n\n".join(part for part in (before, after) if part)
    room = (_MAX_DESCRIPTION - len(before) - len(after) - len(start) - len(end) - 8)
    if room < 80:  # the user's text leaves no useful room: keep it whole, without the section
        return "\n\n".join(part for part in (before, after) if part)[:_MAX_DESCRIPTION]
    text = text if len(text) <= room else text[:room - 1] + "…"
    section = f"{start}\n{text.strip()}\n{end}"
    return "\n\n".join(part for part in (before, section, after) if part)
