"""The replication study (`latent-study`): every method × seeds on one task, selected on validation,
tested with the evaluation harness, reported as summary.json, results.md and plots."""
