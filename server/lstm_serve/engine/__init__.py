"""The math and the models: no transport, no sessions. Imports nothing of grpc."""
