"""Eager PyTorch ground truth, float64-capable, written from the source documents and matching
timm's semantics: ``vitkern.reference.attention``, ``.swin``, ``.performer``."""
