"""model=dense: transformers' GPT-2 (config.py: its keys and rules; model.py: the model). Importing the package
imports nothing, so config validation can read config.py without torch."""
