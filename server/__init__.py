"""Tandem's gRPC front: servicers, CLI, metrics and request mapping.

Tensor-free except server/engines.py, the one module that imports the engine.
"""
