"""Tests of hf_adaquant.allocation."""
