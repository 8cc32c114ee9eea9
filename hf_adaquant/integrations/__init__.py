"""Glue to other libraries (timm layers, transformers quantizer registration, accelerate)."""
