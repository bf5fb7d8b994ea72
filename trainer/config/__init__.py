"""The config a run is given: the trainer's schema (schema.py), validation of a composed config and its record
(validate.py), and one-line explanations of config mistakes (explain.py). Standard library, Hydra and
OmegaConf only: `trainer/run.py --cfg job` imports no torch."""
