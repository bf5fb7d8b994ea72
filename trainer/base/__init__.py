"""The ground floor every other package may stand on: user errors, atomic and strict-JSON files, the hub
probe, the callback protocol, metric keys and config range rules.

It lives inside trainer/ because the design card fixes the top level (conf/ trainer/ models/ data/ eval/
tests/ outputs/); it is the one part of trainer/ that data/ and models/ may import, and it imports nothing
from trainer/, data/, models/ or eval/ (both are contracts in pyproject.toml, checked by lint-imports).
Standard library only: importing it never imports torch.
"""
