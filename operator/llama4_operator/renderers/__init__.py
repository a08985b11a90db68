"""Pure renderers: desired objects and engine settings built from the spec and the plans."""
