"""Which model is best on which domain: the text groups' perplexity of every model, normalised
between 0 and 1 per domain, from the per-model figures `<label>/ppl_<group>` and `<label>/nll_<group>`.

Per domain, normalised perplexity = (ppl − min) / (max − min) over the models compared: 0 is the
best model on that domain, 1 the worst (every model 0 when all are equal). The raw perplexity and
mean NLL stay beside it: the normalised figure ranks the models, it does not say by how much.
"""
from __future__ import annotations

from dataclasses import dataclass

DOMAIN_FILE = "tunelens/domain_perplexity.json"


def min_max(values: dict[str, float]) -> dict[str, float]:
    """(x − min) / (max − min) for each value; 0 for every value when max = min."""
    low, high = min(values.values()), max(values.values())
    spread = high - low
    return {key: (value - low) / spread if spread > 0 else 0.0 for key, value in values.items()}


@dataclass(frozen=True)
class DomainPerplexity:
    """Domain × model: perplexity, mean NLL per token and perplexity normalised per domain."""

    domains: list[str]
    labels: list[str]
    ppl: dict[str, dict[str, float]]  # domain -> label -> exp(mean NLL over the domain's tokens)
    nll: dict[str, dict[str, float]]  # domain -> label -> mean NLL per token (nats)
    normalised: dict[str, dict[str, float]]  # domain -> label -> min-max of ppl across the labels
    notes: list[str]

    def best(self, domain: str) -> str:
        """The label with the lowest perplexity on `domain` (the first listed on a tie)."""
        return min(self.labels, key=lambda label: self.ppl[domain][label])

    def metrics(self) -> dict[str, float]:
        """`<label>/ppl_norm_<domain>` for every model and domain."""
        return {f"{label}/ppl_norm_{domain}": value
                for domain, values in self.normalised.items() for label, value in values.items()}

    def to_dict(self) -> dict:
        return {"domains": self.domains, "models": self.labels,
                "rows": [{"domain": domain, "best": self.best(domain),
                          "normalised_ppl": self.normalised[domain], "ppl": self.ppl[domain],
                          "nll": self.nll[domain]} for domain in self.domains],
                "notes": self.notes}


def domain_perplexity(labels: list[str], domains: list[str], metrics: dict[str, float],
                      notes: list[str] = ()) -> DomainPerplexity:
    """The table for the models `labels` on the text groups `domains`, from `metrics`."""
    ppl = {d: {label: metrics[f"{label}/ppl_{d}"] for label in labels} for d in domains}
    nll = {d: {label: metrics[f"{label}/nll_{d}"] for label in labels} for d in domains}
    return DomainPerplexity(list(domains), list(labels), ppl, nll,
                            {d: min_max(values) for d, values in ppl.items()}, list(notes))
