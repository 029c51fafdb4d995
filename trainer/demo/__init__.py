"""Demo tasks and the adapters trained on them: ``python -m loraplex.trainer.demo`` rebuilds ``adapters/``."""
