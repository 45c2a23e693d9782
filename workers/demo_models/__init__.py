"""Small bundled demo models (weights shipped in the repository)."""
