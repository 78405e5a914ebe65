"""The consume loop: receive, prepare, batch, write, delete (etl/pipeline.py orchestrates)."""
