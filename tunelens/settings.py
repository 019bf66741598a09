"""conf.yaml's sections as types: every key, its type and its allowed range, checked once at load.

`load_config` validates the merged settings against `Settings` before anything runs, so a wrong
value is one line naming the key and what is allowed (`analysis.top_neurons: ... >= 1`), at start-up,
never a KeyError or ValueError later inside a worker thread. Unknown keys are refused the same way.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Share = Annotated[float, Field(gt=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    """One conf.yaml section: unknown keys refused, values checked as the model says."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AnalysisSettings(Section):
    top_neurons: Count
    heatmap_size: PositiveInt
    report_max_heatmaps: Count
    png_charts: bool
    histogram_bins: PositiveInt
    histogram_exact_max_entries: Count
    histogram_sample_entries: PositiveInt
    intruder_top_k: PositiveInt
    intruder_cos_threshold: Annotated[float, Field(gt=0, le=1)]
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    threads: Annotated[int, Field(ge=1)] | None


class FullDiffSettings(Section):
    top_singular_values: PositiveInt
    oversample: Count
    # None misestimated σ₁ by 22% on a dense delta; 2 by under 1%.
    power_iterations: Annotated[int, Field(ge=2)]
    exact_max_dim: Count
    rank_rtol: Share
    lanczos_min_dim: PositiveInt
    intruders_randomized: bool
    intruder_reference_k: PositiveInt
    heatmap_max_entries: Count


class GenerationSettings(Section):
    """Decoding settings applied identically to the base and every adapter."""

    max_new_tokens: PositiveInt
    temperature: Annotated[float, Field(ge=0)]  # 0 = greedy
    top_p: Annotated[float, Field(gt=0, le=1)]
    seed: int
    stop: list[str]
    prompt_template: str
    chat_template: bool
    system_prompt: str | None

    @field_validator("prompt_template")
    @classmethod
    def _has_the_input(cls, template: str) -> str:
        if "{input}" not in template:
            raise ValueError("must contain {input}, where each row's input goes")
        return template

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class ExactMatchSettings(Section):
    strip: bool
    ignore_case: bool
    ignore_punctuation: bool
    ignore_numbers: bool
    regexes_to_ignore: list[str]


class BehaviourSettings(Section):
    preamble_patterns: list[str]
    explanation_patterns: list[str]


class VllmSettings(Section):
    dtype: Literal["auto", "float32", "float16", "bfloat16"]
    max_model_len: Annotated[int, Field(ge=1)] | None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None
    kv_cache_gib: Annotated[float, Field(gt=0)] | None
    tensor_parallel_size: PositiveInt
    pipeline_parallel_size: PositiveInt
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None
    enforce_eager: bool
    max_lora_rank: Annotated[int, Field(ge=1)] | None


class EndpointSettings(Section):
    url: Annotated[str, Field(pattern=r"^https?://")] | None
    api_key_env: Name | None
    timeout_s: Positive


class TransformersSettings(Section):
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
    dtype: Literal["auto", "float32", "float16", "bfloat16"]


class LatencySettings(Section):
    sample_rows: Count  # 0: no served-latency or memory pass; otherwise at least 2 (a paired ratio)
    warmup_requests: Count
    max_rounds: PositiveInt
    max_core_wait: Share | None
    concurrency: Annotated[list[PositiveInt], Field(min_length=1)]

    @field_validator("sample_rows")
    @classmethod
    def _off_or_paired(cls, rows: int) -> int:
        if rows == 1:
            raise ValueError("must be 0 (off) or at least 2")
        return rows


class TextsSettings(Section):
    groups: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")], Name] | None
    guard: list[Name]
    margin: Annotated[float, Field(ge=0)]
    max_texts: PositiveInt | None
    drift_texts: Count


class EvaluationSettings(Section):
    inputs_column: Name
    targets_column: Name
    backend: Literal["auto", "vllm", "transformers", "openai_server"]
    max_rows: Annotated[int, Field(ge=1)] | None
    experiment: Name
    metrics: Annotated[list[Literal["exact_match", "token_f1", "chrf", "rouge_l"]],
                       Field(min_length=1)]
    task_profile: Literal["grammar"] | None
    served: Literal["adapter", "merged"]
    latency: LatencySettings
    texts: TextsSettings
    generation: GenerationSettings
    exact_match: ExactMatchSettings
    behaviour: BehaviourSettings
    vllm: VllmSettings
    transformers: TransformersSettings
    endpoint: EndpointSettings


class VerdictSettings(Section):
    primary_metric: Name  # a built-in metric or an extra_metrics name, known only at evaluation
    alpha: Share
    confidence_level: Share
    bootstrap_resamples: Annotated[int, Field(ge=100)]
    seed: int
    power: Share
    noninferiority_margin: Annotated[float, Field(ge=0, lt=1)]
    max_latency_ratio: Annotated[float, Field(gt=0)] | None
    latency_at: PositiveInt
    max_memory_ratio: Annotated[float, Field(gt=0)] | None
    max_memory_gib: Annotated[float, Field(gt=0)] | None
    max_mean_words_ratio: Annotated[float, Field(gt=0)] | None
    same_memory_within: Annotated[float, Field(ge=0, lt=1)]


AliasName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]


class PromotionSettings(Section):
    alias: AliasName
    auto_promote: bool
    guarded_aliases: list[AliasName] | None  # None: [alias]
    verdict_key_file: Name
    audit_experiment: Name

    @property
    def guarded(self) -> frozenset[str]:
        """The aliases the gate holds."""
        return frozenset([self.alias] if self.guarded_aliases is None else self.guarded_aliases)


class HooksSettings(Section):
    models: list[Name] | Name | None  # names or glob patterns; None: the command's default scope
    models_tag: Annotated[str, Field(pattern=r"^[^=]+=.*$")] | None  # KEY=VALUE opt-in tag
    experiment: Name
    claim_prefix: Name
    base_models: dict[str, str]
    lease_seconds: Positive
    max_attempts: PositiveInt
    poll_interval: Positive
    analysis_timeout_seconds: Positive
    evaluation_timeout_seconds: Positive
    workers: PositiveInt
    host: Name
    port: Annotated[int, Field(ge=0, le=65535)]
    public_url: str | None
    webhook_name: Name
    max_body_bytes: PositiveInt
    max_download_bytes: PositiveInt
    max_age_seconds: Positive
    evaluate_on_registration: bool


class ServerSettings(Section):
    host: Name
    port: Annotated[int, Field(ge=1, le=65535)]
    data_dir: Name
    backend_store_uri: str | None
    workers: PositiveInt
    registry_store_plugin: bool


class TrainingSettings(Section):
    steps: PositiveInt
    batch_size: PositiveInt
    learning_rate: Positive


class DemoSettings(Section):
    seed: int
    examples: Annotated[int, Field(ge=10)]
    test_share: Share
    base_training: TrainingSettings
    adapter_training: TrainingSettings
    lora_rank: PositiveInt
    model_name: Name


class Settings(Section):
    """The whole of conf.yaml."""

    analysis: AnalysisSettings
    full_diff: FullDiffSettings
    evaluation: EvaluationSettings
    verdict: VerdictSettings
    promotion: PromotionSettings
    hooks: HooksSettings
    server: ServerSettings
    demo: DemoSettings

    @model_validator(mode="after")
    def _judged_level_is_timed(self) -> "Settings":
        """The latency rule judges a concurrency level that is timed (1 always is)."""
        levels = {1, *self.evaluation.latency.concurrency}
        if self.verdict.latency_at not in levels:
            raise ValueError(f"verdict.latency_at {self.verdict.latency_at} is not a timed level "
                             f"(evaluation.latency.concurrency: {sorted(levels)})")
        return self
