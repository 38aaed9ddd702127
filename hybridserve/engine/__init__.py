"""The engine: requests, scheduler, KV blocks and Mamba state slots, model runner, sampler, engine
core (in-process or its own process), the ZMQ client, output processing and the offline LLM."""
