"""vlm_sweep: Hydra experiment suite for fine-tuning vision-language models."""
