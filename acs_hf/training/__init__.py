"""The training runtime: the trainers, the selection rounds between their epochs, and their checkpoints."""
