"""MoRe-py: class patch attention regularisation for weakly supervised semantic segmentation."""
from wetr.model import MoRe, MoReOutput, build_model, load_weights

__all__ = ["MoRe", "MoReOutput", "build_model", "load_weights"]
