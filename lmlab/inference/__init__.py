"""A loaded run continues text: the next token chosen, pairs scored, the batched decoder, its compiled step, and
text on top of it (samples, chats, instructions)."""
