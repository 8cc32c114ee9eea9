"""Tests of hf_adaquant.prepare."""
