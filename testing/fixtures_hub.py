"""Fixtures for a local Hugging Face Hub stand-in (filled in with tune-ckpt)."""
