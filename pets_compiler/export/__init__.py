"""ONNX export of the multi-task program (issue 6)."""
