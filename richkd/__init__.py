"""RichKD-Tune: hyperparameter search for CLIP-fused knowledge distillation (RichKD).

Importing this package is light on purpose: ray, open_clip and mlflow load only where they are used.
"""
__version__ = "0.1.0"
