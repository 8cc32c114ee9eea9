"""Tests of hf_adaquant.hub."""
