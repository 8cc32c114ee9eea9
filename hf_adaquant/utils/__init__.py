"""Small shared helpers: calibration batches, seeding."""
