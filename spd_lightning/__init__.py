"""spd-lightning."""
