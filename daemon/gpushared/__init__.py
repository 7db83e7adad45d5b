"""gpushared: shares AMD Instinct MI300X GPUs between LLM workloads (version only, kept import-cheap)."""

__version__ = "0.1.0"
