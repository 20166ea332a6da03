"""Peer transport: the gRPC Peer service and its client side, and the plain-TCP replication
stream."""

PEER_STREAMS = ("tcp", "grpc")  # how replication frames travel (--peer-stream)
