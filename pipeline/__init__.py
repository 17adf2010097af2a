"""Latent chain-of-thought training pipeline: data, models, methods, DeepSpeed strategy, training entry."""
