"""Tests of hf_adaquant.nn."""
