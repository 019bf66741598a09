"""tunelens's sections in a registered version's description, beside the user's own text.

tunelens writes the description only between its own markers (`replace_section`): the user's
text around them is kept as it is, and any tunelens section (the analysis, an evaluation) can be
replaced on its own. The markers are markdown link-reference definitions, which every markdown
renderer (MLflow's UI included) shows as nothing.
"""
from __future__ import annotations

import re

# The analysis section's heading: a description written before the markers existed has it alone.
DESCRIPTION_HEADING = "### tunelens analysis"
ANALYSIS_SECTION = "analysis"
_MAX_DESCRIPTION = 5000  # the registry's description column

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#])")


def escape_markdown(text: str) -> str:
    """`text` shown literally by a markdown renderer (‖ΔW‖_F must not open an italic)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


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
