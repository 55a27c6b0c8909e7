"""What the command-line tools share (cli), inference on images (inference), export for
serving (export) and the paper's spectral analysis (frequency_analysis)."""
