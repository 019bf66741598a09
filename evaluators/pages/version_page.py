"""The comparison on the model version's page: a markdown section of its description.

It sits next to the weight analysis's section, between markers of its own, through the same
`replace_section` the analysis uses (the user's text and the analysis stay): the verdict and its
parts, a table of base / candidate / holder (primary metric, words, p50 / p95 latency, memory,
perplexity on each text group), latency and throughput against concurrency when several levels
were timed, one line per deciding rule, and links to the side-by-side page and the evaluation run.
"""
from __future__ import annotations

import math

from tunelens.evaluators.pages.load import markdown_lines
from tunelens.evaluators.verdict import Decision, Verdict

EVALUATION_SECTION = "evaluation"  # the key of its markers in the description
EVALUATION_HEADING = "### tunelens evaluation"
_RULE_CHARS = 300  # one rule's line on the page; the full text is in verdict.json


def _figure(metrics: dict[str, float], label: str, name: str, fmt: str) -> str:
    """`label`'s logged `name`, formatted; "not measured" when it was not (never a stand-in)."""
    value = metrics.get(f"{label}/{name}")
    return format(value, fmt) if value is not None and math.isfinite(value) else "not measured"


def comparison_section(*, verdict: Verdict, labels: list[str], names: dict[str, str],
                       metrics: dict[str, float], primary: str, test: str, rows: int,
                       experiment_id: str, run_id: str, report_file: str) -> str:
    """The markdown section; `names` gives each label its display name ("v3 (candidate)")."""
    run_link = f"#/experiments/{experiment_id}/runs/{run_id}"
    part_names = {"base": "vs base", "holder": f"vs holder {names.get(labels[2], '')}".strip()
                  if len(labels) > 2 else "vs holder"}
    parts = "; ".join(f"{part_names[p.against]} **{p.decision.value}**" for p in verdict.parts)
    groups = [key.split("/ppl_", 1)[1] for key in metrics if key.startswith(f"{labels[0]}/ppl_")]
    lines = [EVALUATION_HEADING, "",
             f"**{verdict.decision.value}** on {rows} rows ({parts}); primary metric `{primary}` "
             f"({test}).", "",
             f"| model | {primary} | mean words | served latency p50 / p95 (ms) | memory as served (GiB) |"
             + "".join(f" perplexity {group} |" for group in groups),
             "|---|---|---|---|---|" + "---|" * len(groups)]
    for label in labels:
        latency = (f"{_figure(metrics, label, 'served_latency_ms_p50', fmt='.0f')}"
                   f" / {_figure(metrics, label, 'served_latency_ms_p95', fmt='.0f')}")
        lines.append(f"| {names.get(label, label)} | {_figure(metrics, label, primary, fmt='.3f')} "
                     f"| {_figure(metrics, label, 'mean_words', fmt='.1f')} | {latency} "
                     f"| {_figure(metrics, label, 'memory_total_gib', fmt='.3f')} |"
                     + "".join(f" {_figure(metrics, label, f'ppl_{g}', fmt='.4g')} |"
                               for g in groups))
    lines += markdown_lines(labels, names, metrics)
    lines.append("")
    for part in verdict.parts:
        # the rules that decided; for a PROMOTE part, its quality rule (why it counts as better)
        shown = part.deciding() if part.decision is not Decision.PROMOTE else part.rules[:1]
        for rule in shown:
            detail = rule.detail if len(rule.detail) <= _RULE_CHARS else \
                rule.detail[:_RULE_CHARS - 1] + "…"
            lines.append(f"- {part_names[part.against]}: `{rule.name}` {rule.status}: {detail}")
    lines += ["", f"Side by side: [{report_file.rsplit('/', 1)[-1]}]"
                  f"({run_link}/artifactPath/{report_file}); "
                  f"evaluation: [run {run_id[:8]}]({run_link})."]
    return "\n".join(lines)


def unmeasured_section(*, verdict: Verdict, experiment_id: str, run_id: str) -> str:
    """The markdown section of an evaluation in which no model gave an output: the decision and
    the one line why (the rule every part left undecided)."""
    run_link = f"#/experiments/{experiment_id}/runs/{run_id}"
    why = verdict.parts[0].rules[0].detail
    return "\n".join([EVALUATION_HEADING, "",
                      f"**{verdict.decision.value}**: nothing was measured, so nothing was judged: "
                      f"{why}.", "", f"Evaluation: [run {run_id[:8]}]({run_link})."])
