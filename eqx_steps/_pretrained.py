"""The names of the pretrained weights shipped with the package.

Apart from the models, so that the command's parser can list them without
starting JAX (`eqx-steps --help` imports neither JAX nor Equinox).
"""

SCICO_DNCNN_VARIANTS = ("6L", "6M", "6H", "6N", "17M")
"""The pretrained DnCNN variants shipped with the package (SCICO's own files):
6 or 17 layers, trained at noise level L (0.06), M (0.10), H (0.20) for images in
`[0, 1]`, or N (the noise level is a second input channel)."""
