"""The Ray Serve application that llama4-operator deploys: engines and the OpenAI-compatible API."""
