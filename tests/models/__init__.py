"""Tests of hf_adaquant.models."""
