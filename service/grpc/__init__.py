"""The KServe V2 gRPC front-end (:mod:`service.grpc.server`) and its stubs, generated from
``grpc_predict_v2.proto`` by ``scripts/generate_grpc.sh``."""
