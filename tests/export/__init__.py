"""Tests of hf_adaquant.export."""
