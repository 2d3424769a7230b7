"""The method's numbers, each written once: every default in salmask refers to this module.

They are the paper's and its public release's settings (see the method's notes): where paper and release
differ, the release's, which produced the published numbers.
"""

from __future__ import annotations

# Where to mask (paper section 3.2).
#: Names of the mask types, in the order of their integer codes in a draw's ``"mask_type"``.
MASK_TYPES = ("spatial", "channel", "focal")
#: alpha: the fraction of the patch grid masked in a positive view, drawn per image.
MASK_RATIO = (0.05, 0.25)
#: beta: the fraction of the foreground masked in a hard negative, drawn per image.
HARD_NEGATIVE_MASK_RATIO = (0.4, 0.7)
#: Side of a patch in pixels: the 7 x 7 grid of a 224 px view, one cell of SCDA's map each.
PATCH_SIZE = 32
#: Mean saliency a patch needs to count as foreground.
SALIENCY_THRESHOLD = 0.5
#: Side of the window a focal positive keeps, and a focal hard negative fills, relative to the view.
FOCAL_KEEP_FRACTION = 200 / 224
FOCAL_FILL_FRACTION = 130 / 224
#: The high-pass release's mask types: focal with p=0.2, else spatial with p=0.3, else channel-wise.
RELEASE_MASK_TYPE_PROBS = {"spatial": 0.24, "channel": 0.56, "focal": 0.2}
SPATIAL_ONLY = {"spatial": 1.0}

# How to fill (paper section 3.2, release).
#: The high-pass filter: the view minus its Gaussian blur of this kernel and sigma.
HIGH_PASS_KERNEL_SIZE = 11
HIGH_PASS_SIGMA = 5.0
#: Standard deviation of the high-pass recipe's noise in positives and in hard negatives.
HIGH_PASS_NOISE_STD = 0.18
HIGH_PASS_HARD_NEGATIVE_NOISE_STD = 0.14
#: The strong blur whose values masked pixels take.
BLUR_KERNEL_SIZE = 31
BLUR_SIGMA = 10.0

# Loss and MoCo (paper Eq. 2, release).
#: tau.
TEMPERATURE = 0.2
#: rho, the weight of the hard-negative similarities.
HARD_NEGATIVE_WEIGHT = 2.0
#: K, the keys in MoCo's queue.
QUEUE_SIZE = 65536
#: m, the momentum of MoCo's key encoder.
KEY_ENCODER_MOMENTUM = 0.999
#: Size of the embeddings the projection heads return.
EMBEDDING_DIM = 128

# Saliency (paper section 3.1).
#: k in SCDA's foreground rule A >= mean(A) - k * std(A).
SCDA_THRESHOLD_STD = 0.6
