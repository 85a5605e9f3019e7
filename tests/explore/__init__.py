"""Tests of sopvit.explore: embeddings tables, search, near-duplicates and prototype assignment."""
