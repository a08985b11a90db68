"""The `vllm` engine: vLLM served through Ray Serve LLM (`ray.serve.llm`)."""
