"""Requests checked per kind: ``generate`` (a generation), ``train`` (a DreamBooth LoRA
training) and ``adapters`` (a generation's ``job:`` LoRAs, checked against the store).
Each refusal names every bad field; a request that passes comes back normalised.
"""
