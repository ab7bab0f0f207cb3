"""The core: the model file, graph facts, numerics, inputs and outputs. It imports nothing above it
(no pass, no analysis, no command)."""
