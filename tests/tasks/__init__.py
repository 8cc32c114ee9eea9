"""Tests of hf_adaquant.tasks."""
