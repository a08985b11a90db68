"""Inference engines behind the Serve application."""
