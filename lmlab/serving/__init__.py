"""A run behind an OpenAI-compatible HTTP API. The app imports no torch at its top: the port opens first, and
startup loads the run behind it."""
