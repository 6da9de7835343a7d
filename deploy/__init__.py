"""Deployment: the export file and its formats, channel removal for compact models, sparse and
quantized storage encodings, and size / latency measurement."""
