"""What differs between kinds of model: outputs and their decoding, metrics, the gate's checks."""
