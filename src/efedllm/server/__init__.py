"""Server role: hosts a span of blocks, serves sessions over hivemind P2P, announces itself in the DHT."""
