"""A fourth model family that lives outside models/: the proof that adding a family is one folder, one registry
line (models.registry.register_family, from the test) and one conf/model/<family>.yaml, with no edit to
trainer/, data/ or eval/. A bag of two linear maps mixed by a learned gate: small, and routed, so the
trainer's routing statistics, callbacks and figures-at-the-end path all run."""
