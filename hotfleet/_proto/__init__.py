"""Generated protobuf/gRPC stubs: do not edit, run scripts/gen_protos.py.

Produced by grpcio-tools 1.85.1 from proto/.
"""
