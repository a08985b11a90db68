"""The reference engine: the Llama 4 text model in torch with continuous batching."""
