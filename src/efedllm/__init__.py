"""efedllm: federated LLM inference across servers that do not trust each other (eFedLLM, arXiv 2411.16003)."""

__version__ = "0.1.0"
