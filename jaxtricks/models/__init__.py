"""Model configs and the Transformer LM that composes layers by config."""
