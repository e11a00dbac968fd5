"""S²-Guidance and the guidance methods it is compared with, on a from-scratch SD3 rectified-flow stack."""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"  # the embedded models' and the evaluator's weights
