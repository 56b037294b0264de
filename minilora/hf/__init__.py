"""Hugging Face files in and out: transformers checkpoint directories and model ids from the Hub cache."""
