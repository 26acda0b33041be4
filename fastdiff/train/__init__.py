from fastdiff.train.add import train_add
from fastdiff.train.ddpm import train_ddpm

__all__ = ["train_add", "train_ddpm"]
