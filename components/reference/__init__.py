"""The demo's and the benchmark's own models and data. The stages never import these."""
