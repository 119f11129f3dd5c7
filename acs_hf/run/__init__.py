"""Run orchestration: the recipe's arguments, checks before any work, and the end-to-end job."""
