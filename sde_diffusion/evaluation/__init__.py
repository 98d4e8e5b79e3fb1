"""Sample-quality evaluation: FID/KID/IS through the FID Inception (``fid``, ``inception``) and classifier-based
metrics for the 8x8 digits that need no download (``digits``)."""
from . import digits, fid, inception  # noqa: F401
from .digits import DigitsEvaluator, classify  # noqa: F401
from .fid import frechet_distance, inception_score, kid  # noqa: F401
from .inception import FIDInceptionV3, load_fid_inception  # noqa: F401
