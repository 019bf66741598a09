"""tunelens: see how a LoRA fine-tune changed the weights, and whether it beats its base, in MLflow."""

__version__ = "0.1.0"
