"""Models and their data: adapters for text and vision models, loading, calibration data, activation capture."""
