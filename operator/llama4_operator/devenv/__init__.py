"""The local development environment: pinned tools and a real local control plane."""
