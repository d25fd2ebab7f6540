"""The delta file: its format (every kind) and sharing it through a folder or the Hugging Face Hub."""
