"""The on-device agent: sources → SQLite buffer → ONNX inference → forwarder."""
