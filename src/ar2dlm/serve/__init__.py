"""`ar2dlm serve`: an OpenAI-compatible HTTP server over the decode engine, with continuous batching."""
