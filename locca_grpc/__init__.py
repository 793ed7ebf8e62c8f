"""The gRPC stubs of proto/locca/v1/locca.proto, generated when the package is built (setup.py) and shipped in
the wheel beside a copy of the .proto: `locca_grpc.locca_pb2`, `locca_grpc.locca_pb2_grpc`, `locca_grpc/locca.proto`.
A source checkout has none of them until it is built; service/protos.py then generates the same stubs into
build/grpc on first use. Never edit generated files: change the .proto."""
