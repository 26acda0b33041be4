from fastdiff.train.ddpm import train_ddpm

__all__ = ["train_ddpm"]
