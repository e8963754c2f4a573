"""MoRe-py: class patch attention regularisation for weakly supervised semantic segmentation."""
from wetr.factory import load_weights
from wetr.model import MoRe, MoReOutput, build_model

__all__ = ["MoRe", "MoReOutput", "build_model", "load_weights"]
