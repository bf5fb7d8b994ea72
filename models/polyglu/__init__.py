"""model=polyglu, the PolyGLU family: PolychromaticLM.

config.py (keys and rules), model.py (the family's model), transformer.py (the backbone), attention.py (GQA with
QK-norm on the shared backends of models/layers), ffn.py (PolyGLU), stats.py (the routing statistics it
reports), callbacks.py (tau schedule, routing-entropy warning). Importing the package imports nothing, so
config validation can read config.py without torch.
"""
