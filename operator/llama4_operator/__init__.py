"""llama4-operator: serve Llama 4 mixture-of-experts models on Kubernetes GPU clusters."""

__version__ = "0.1.0"
