"""Physical slicing: the LM head and the loss only at positions whose target is kept."""
