"""The trainer: schema, loop, engines, checkpoints, tracking. Importing this package does not import torch."""
