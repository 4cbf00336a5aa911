"""Chat templates kvloom ships (``--chat-template NAME``)."""
