"""Tests of hf_adaquant.utils."""
