"""The perplexity-by-domain section that leads the comparison page (templates/domains_section.html)."""
from __future__ import annotations

from markupsafe import Markup

from tunelens.evaluators.pages.report import PAGES
from tunelens.evaluators.texts.domain_table import DomainPerplexity


def domains_section(table: DomainPerplexity) -> Markup:
    """Domain × model: normalised perplexity, raw perplexity and NLL, the best model in green."""
    rows = []
    for domain in table.domains:
        best = table.best(domain)
        rows.append({"domain": domain, "best": best, "cells": [
            {"normalised": f"{table.normalised[domain][label]:.2f}",
             "ppl": f"{table.ppl[domain][label]:.4g}", "nll": f"{table.nll[domain][label]:.3f}",
             "css": "ok" if label == best else ""} for label in table.labels]})
    return Markup(PAGES.get_template("domains_section.html").render(
        labels=table.labels, rows=rows, notes=table.notes))
