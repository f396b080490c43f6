"""msode_export: turn per-scale networks into `.plan` bundles (TorchScript, ONNX, TensorRT, registrar.ts)."""
