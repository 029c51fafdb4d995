"""The gRPC API: loraplex.v1 and Open Inference Protocol servicers, health, reflection, auth and error mapping.

The only server code that imports the generated protobuf modules (``loraplex.proto``); it converts protobuf to the
engine's value types and back and never touches tensors. Beside it, :mod:`.http` is the OpenAI-compatible HTTP API
on the same serving state (it imports no protobuf).
"""
