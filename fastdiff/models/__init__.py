from fastdiff.models.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
