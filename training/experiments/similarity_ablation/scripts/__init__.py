"""The similarity ablation's scripts (issue 4), run as modules from the repository root, e.g.
``python -m training.experiments.similarity_ablation.scripts.seeds_report --help``."""
