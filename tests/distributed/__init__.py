"""Tests of hf_adaquant.distributed."""
