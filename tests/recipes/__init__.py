"""Tests of hf_adaquant.recipes."""
