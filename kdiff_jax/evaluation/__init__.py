"""Evaluation of generative models: FID and KID (metrics.py) on Inception-v3 features (inception.py, resize.py)."""
