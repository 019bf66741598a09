"""What one analysis leaves in MLflow: a run (metrics, params, artifacts, table) and version tags.

The run lives in experiment hooks.experiment (default `tunelens-analysis`), tagged
tunelens.model_name / tunelens.model_version. The per-layer profile is logged as stepped metrics
(step = layer index) so MLflow's own charts draw it. The version gets the summary tags and a
short markdown section in its description (tunelens.registry.description) pointing to the run's
report.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModelInput, Metric, Param

from tunelens.machine import this_machine
from tunelens.registry.base_model import BaseModelResolution
from tunelens.registry.description import DESCRIPTION_HEADING, escape_markdown
from tunelens.registry.version import logged_model_id
from tunelens.registry_hooks.report.narrative import narrate
from tunelens.registry_hooks.report.outputs import AnalysisFiles
from tunelens.registry_hooks.engine.result import AnalysisResult

MODEL_NAME_TAG = "tunelens.model_name"
MODEL_VERSION_TAG = "tunelens.model_version"
ARTIFACT_DIR = "tunelens"
TABLE_FILE = "tunelens/modules.json"
_MAX_PARAM = 6000


def analysis_runs(client: MlflowClient, experiment: str, name: str, version: str) -> list:
    """Every live run in the analysis experiment made for this version."""
    runs = client.search_runs([experiment], f"tags.`{MODEL_VERSION_TAG}` = '{version}'",
                              max_results=1000)
    return [r for r in runs if r.data.tags.get(MODEL_NAME_TAG) == name]


def top_layer(result: AnalysisResult) -> int | None:
    """The layer with the largest S_ℓ = Σ‖ΔW‖_F over its modules."""
    finite = [p for p in result.layers if math.isfinite(p.fro_sum)]
    return max(finite, key=lambda p: p.fro_sum).layer if finite else None


def summary_tags(result: AnalysisResult) -> dict[str, str]:
    """The version's summary tags: sizes, layers, and the two means of ‖ΔW‖_F (per module, a
    fused projection counted once; per layer, S_ℓ), each with its max ("nan" when undefined)."""
    summary = result.summary
    layer = top_layer(result)
    sizes = {"mean_module_fro": summary.mean_module_fro, "max_module_fro": summary.max_module_fro,
             "mean_layer_fro_sum": summary.mean_layer_fro_sum,
             "max_layer_fro_sum": summary.max_layer_fro_sum}
    return {"tunelens.trainable_params": str(summary.trainable_params),
            "tunelens.layers_modified": str(len(summary.layers_modified)),
            "tunelens.top_layer": "" if layer is None else str(layer),
            **{f"tunelens.{key}": f"{value:.6g}" for key, value in sizes.items()}}


def _metrics(result: AnalysisResult, now_ms: int) -> list[Metric]:
    summary = result.summary
    scalars = {"trainable_params": summary.trainable_params,
               "layers_modified": len(summary.layers_modified),
               "mean_module_fro": summary.mean_module_fro,
               "max_module_fro": summary.max_module_fro,
               "mean_layer_fro_sum": summary.mean_layer_fro_sum,
               "max_layer_fro_sum": summary.max_layer_fro_sum,
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
            f"tunelens weight analysis of registered model `{name}` version {version}.",
        **this_machine().tags()})
    run_id = run.info.run_id
    try:
        link_logged_model(client, run_id, name, version)
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


def link_logged_model(client: MlflowClient, run_id: str, name: str, version: str) -> None:
    """Log the version's LoggedModel as the run's input model, so the model and the run name each
    other."""
    model_id = logged_model_id(client.get_model_version(name, version))
    if model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])


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
             f"- mean {escape_markdown('‖ΔW‖_F')} per module (a fused projection counts once): "
             f"**{summary.mean_module_fro:.4g}**, max {summary.max_module_fro:.4g}",
             *([f"- mean per-layer {escape_markdown('S_ℓ = Σ‖ΔW‖_F')} over its matrices: "
                f"**{summary.mean_layer_fro_sum:.4g}**, max {summary.max_layer_fro_sum:.4g}"]
               if math.isfinite(summary.mean_layer_fro_sum) else []),
             f"- base model: {base_text}"]
    lines += [f"- {escape_markdown(line)}" for line in narrate(result)[:3]]
    lines += ["", f"Report: [run {run_id[:8]}](#/experiments/{experiment}/runs/{run_id}), "
                  f"artifact `{ARTIFACT_DIR}/report.html`."]
    return "\n".join(lines)
