"""model=moe, the MoE-emergence family: GPT-2 with routed Mixture-of-Experts FFNs in its last blocks.

config.py (keys and rules), model.py (the family's model), layer.py / router.py / dispatch.py / losses.py (the
MoE layer and its parts), stats.py (the routing statistics it reports), callbacks.py (router-noise schedule,
collapse stop, expert-usage figure at the end of a run), figures.py (that figure). Importing the package
imports nothing, so config validation can read config.py without torch.
"""
