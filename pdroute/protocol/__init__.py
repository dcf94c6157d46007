"""Wire-level facts shared by the EPP, the sidecar and the simulator.

Each module here states one protocol fact (header names, vLLM's block hash,
vLLM's KV-event encoding, NixlConnector's ``kv_transfer_params``) in exactly one
place. Nothing here does I/O or imports another part of the project.
"""
