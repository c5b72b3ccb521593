"""Generated gRPC/protobuf stubs for protos/protege/v1 (make protos). Never edit by hand."""
