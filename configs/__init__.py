"""Training configs (ml_collections files with `get_config(arg)`); see common.py for every key."""
