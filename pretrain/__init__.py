"""Model, losses, training loop and checkpointing for long-form video-language pretraining."""
