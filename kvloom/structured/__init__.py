"""Structured outputs: a format (JSON schema, any JSON object, regex, choice, EBNF grammar) enforced
token by token with xgrammar. ``backend.py`` compiles (cached per spec) and keeps one matcher per
request; ``bitmask.py`` applies a step's token bitmask to the logits (torch only)."""
