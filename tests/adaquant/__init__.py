"""Tests of hf_adaquant.adaquant."""
