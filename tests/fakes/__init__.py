"""Generators of small files in the data providers' exact formats, for tests."""
