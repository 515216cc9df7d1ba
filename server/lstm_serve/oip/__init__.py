"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`): a second transport beside
service/ (lstm.v1), over the same DataPlane. docs/oip.md tells users how it maps onto sessions."""

from lstm_serve.oip.servicer import OipServicer

__all__ = ["OipServicer"]
