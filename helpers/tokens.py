"""Special tokens and the label the loss skips, shared by loading, data and the losses.
Imports nothing from the package.
"""

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IGNORE_INDEX = -100  # a label the loss skips (PyTorch's cross-entropy default)
