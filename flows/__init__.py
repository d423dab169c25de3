"""Prefect flows around the DVC pipeline: `retrain` (flows/retrain.py) and its schedule (flows/serve.py).

The library (`spottune/`) knows nothing of Prefect; everything Prefect-specific lives here.
"""
