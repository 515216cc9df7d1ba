"""The gRPC transport: decodes protos, calls the data plane, encodes replies and maps errors. Nothing else."""

from lstm_serve.service.servicer import LstmServicer

__all__ = ["LstmServicer"]
