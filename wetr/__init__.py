"""MoRe-py: class patch attention regularisation for weakly supervised semantic segmentation."""
from wetr.factory import load_weights
from wetr.model import MoRe, MoReOutput, MoReSpec, build_model

__all__ = ["MoRe", "MoReOutput", "MoReSpec", "build_model", "load_weights"]
