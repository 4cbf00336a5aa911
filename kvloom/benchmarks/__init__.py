"""`kvloom bench`: offline throughput and latency, and a load generator for any OpenAI-compatible server."""
