"""Data bundled with graftlib: the demo's labelled review set."""
