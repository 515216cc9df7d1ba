"""Importers and exporters: the formats people train in, turned into a served model directory.

Each importer returns ModelWeights in the npz layout (PyTorch's gate order i, f, g, o). A layout mistake would be
silent (a wrong gate order still runs), so `convert` checks the written model against the source weights before it
reports success, and the tests prove every importer against the source framework's own outputs.
"""

from lstm_serve.convert.run import SOURCE_FORMATS, ConvertOptions, convert, read_weights

__all__ = ["SOURCE_FORMATS", "ConvertOptions", "convert", "read_weights"]
