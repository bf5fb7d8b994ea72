"""Model families behind one interface (models/registry.py), each in its own folder, and the layers they share
(models/layers/). Importing the package imports nothing, so config validation reads family configs without
torch."""
