"""hybridserve: a compact inference server for NVIDIA Nemotron-3-Nano and the NemotronH family."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import hybridserve` stays light (the HTTP process imports no torch model code).
    if name == "LLM":
        from hybridserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from hybridserve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
