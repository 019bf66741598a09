"""analysis.json's document: the result's numbers and the report's words for them, in one dict."""
from __future__ import annotations

import json
from typing import Any

from tunelens.registry_hooks.engine.result import AnalysisResult
from tunelens.settings import AnalysisSettings

from .narrative import glossary_for, narrate


def analysis_document(result: AnalysisResult,
                      settings: AnalysisSettings | None = None) -> dict[str, Any]:
    """result.to_dict() with `narrative` (every sentence, most important first, read to the limits
    of `settings`) and `glossary`."""
    return {**result.to_dict(), "narrative": narrate(result, settings),
            "glossary": glossary_for(result)}


def analysis_json(result: AnalysisResult) -> str:
    """analysis.json's text: compact, strict JSON (NaN/Inf already null) through json's C encoder."""
    return json.dumps(analysis_document(result), allow_nan=False)
