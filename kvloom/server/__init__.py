"""The OpenAI-compatible HTTP server (`kvloom serve`)."""
