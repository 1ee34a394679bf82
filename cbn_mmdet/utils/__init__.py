"""What the stack needs to work on this torch and on CPU-only machines."""
