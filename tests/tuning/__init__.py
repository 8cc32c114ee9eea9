"""Tests of hf_adaquant.tuning."""
