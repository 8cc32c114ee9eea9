"""The test suite; it mirrors the package: tests/<subpackage>/test_<module>.py."""
