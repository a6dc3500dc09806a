"""Framework integrations (transformers, PEFT, TRL, sae-lens), each imported lazily.

``import gradroute`` imports none of these; they load on first use.
"""
