"""The funnel index and its fast top-k selection."""
