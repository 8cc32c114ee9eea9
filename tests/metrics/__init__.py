"""Tests of hf_adaquant.metrics."""
