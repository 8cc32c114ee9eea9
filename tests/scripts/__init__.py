"""Tests of scripts/ (benchmark helpers; they import the scripts by path)."""
