"""Thin Kopf handlers: `kopf_handlers` registers them, `reconcile` holds the level-based logic,
`status` the pure status and condition builders, `config` the operator-wide settings."""
