"""acs_hf in the Hugging Face ecosystem: models by name, transformers' from_pretrained, the Hub."""
