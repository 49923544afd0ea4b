"""Client role: tokenizer, embeddings and LM head; finds a chain of servers and generates."""
