"""Fake Transformer Lab plugin SDK package."""
