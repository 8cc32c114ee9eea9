"""Tests of hf_adaquant.quant."""
