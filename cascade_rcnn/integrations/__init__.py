"""Adapters that let other libraries' pipelines run this project's models (each needs its own optional extra)."""
