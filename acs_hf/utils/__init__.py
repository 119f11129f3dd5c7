"""Helpers below every layer: atomic writes, the seam to private upstream APIs, the old module paths.

Nothing here imports the rest of acs_hf."""
