"""The models: the registry of published variants (registry, factory), SPANet and SPANetV2
(spanet, spanetv2), the Flax layers they share (layers), the spectral filter (spectral),
pretrained directories (pretrained) and Flax NNX interop (nnx_interop)."""
