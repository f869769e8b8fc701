"""One module per reproduced paper figure or table."""
