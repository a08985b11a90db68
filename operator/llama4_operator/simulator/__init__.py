"""Trace-driven autoscaling simulator: replays LLM request traces against a continuous-batching
replica model under the project's `token` policy and the HPA, KEDA, Knative and Ray Serve
baselines. Pure and deterministic for a seed; `llama4ctl simulate` and benchmarks/autoscaling
drive it."""
