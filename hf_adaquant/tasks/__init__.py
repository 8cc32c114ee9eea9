"""Task helpers (data, metrics, evaluation loops) for the benchmarks: ``squad`` for extractive QA."""
