"""loraplex-train: fine-tunes LoRA adapters that the loraplex server serves as-is."""

if __name__ != "loraplex.trainer":  # e.g. `import trainer` from the repository root: a second copy of every module
    raise ImportError(f"import loraplex.trainer, not {__name__}: the folder trainer/ is the package loraplex.trainer")
