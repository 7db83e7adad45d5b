"""gRPC transport: the servicer (protobuf <-> domain), the error table, the server and the front door."""
