"""Tests of hf_adaquant.config."""
