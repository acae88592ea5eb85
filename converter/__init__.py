"""Convert original X-CLIP checkpoints to transformers' XCLIPModel and prove each conversion right.

Modules follow the pipeline: fetch -> load -> rules (map) -> config -> build -> verify -> export.
"""

__version__ = "0.1.0"
