"""The settings: the option schema (every setting's name, type, default, limits and help), the encoder's P-frame
rule, and the federated run's config built from them. Imports nothing but ``common.errors``."""
