"""Weights and configs in and out of other libraries' formats (diffusers)."""

from fastdiff.interop.diffusers import export_run, import_unet, is_diffusers_folder, load_diffusers

__all__ = ["export_run", "import_unet", "is_diffusers_folder", "load_diffusers"]
