"""The engine: requests, scheduler, cache manager (KV blocks, Mamba state slots), step plans, model
runner, sampler, engine core (in-process or its own process), the ZMQ client, output processing and
the offline LLM."""
