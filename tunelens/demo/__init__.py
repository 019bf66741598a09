"""The embedded end-to-end demo: a grammar-correcting LoRA on a tiny local base, seed 004's story."""
