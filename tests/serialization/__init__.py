"""Tests of hf_adaquant.serialization."""
