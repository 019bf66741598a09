"""The embedded end-to-end demo: a grammar-correcting LoRA on a tiny local base, from registration to promotion."""
