"""Smoothed energy guidance (SEG, Hong, NeurIPS 2024, arXiv 2408.00760).

PAG's algebra, D = D_u + w·(D_c - D_u) + s·(D_c - D_seg), with the perturbed pass blurring the image queries of chosen blocks over the token grid (Gaussian, std `blur_sigma`
tokens; > 9999 means infinite: every query becomes the mean, uniform attention over the keys). Defaults are
diffusers' SmoothedEnergyGuidance (w = 7.5, s = 2.8, blur σ = 9999999, steps int(start·N) < i < int(stop·N)
with start 0, stop 1), with block 1 as for PAG (diffusers has no default layer). Note: diffusers 0.42 swaps its
finite and infinite blur branches (`hooks/smoothed_energy_guidance_utils.py`: a finite σ gives the mean);
this follows the official SEG code (SusungHong/SEG-SDXL).
"""
from ..models.sweep import smoothed_attention
from .pag import PerturbedAttentionGuidance


class SmoothedEnergyGuidance(PerturbedAttentionGuidance):
    def __init__(self, scale: float = 7.5, seg_scale: float = 2.8, blur_sigma: float = 9999999.0, layers=(1,),
                 start: float = 0.0, stop: float = 1.0, interval=(0.0, 1.0)):
        super().__init__(scale, seg_scale, layers, start, stop, interval)
        self.blur_sigma = float(blur_sigma)
        self.perturbation = smoothed_attention(self.blur_sigma)  # σ <= 0 fails here, before any sampling
