"""Tests of hf_adaquant.integrations."""
