"""File I/O below everything that uses it: atomic writes, hashes and safetensors (files), training checkpoints
(checkpoints), model / run folders (folders) and the ZImagePipeline folder format (pipeline_format).
Imports nothing of twostep but errors and faults."""
