"""The embedded default world: a tiny draft/target pair on a synthetic addition task."""
