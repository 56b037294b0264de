"""Hugging Face checkpoints in and out: config dicts and state dicts, no model classes (the models call these)."""
