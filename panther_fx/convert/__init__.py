"""Eager conversion for training, saving and export: swap the layers a policy selects for panther modules
(:func:`convert`), and save / load converted models as safetensors plus their policy (:func:`save`, :func:`load`)."""

from .convert import CONVERTERS, ConversionError, ConvertContext, Converted, convert, convertible_layers
from .persist import load, read_policy, save

__all__ = ["CONVERTERS", "ConversionError", "ConvertContext", "Converted", "convert", "convertible_layers", "load",
           "read_policy", "save"]
