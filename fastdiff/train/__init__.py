from fastdiff.train.add import train_add
from fastdiff.train.ddpm import train_ddpm
from fastdiff.train.refiner import train_refiner

__all__ = ["train_add", "train_ddpm", "train_refiner"]
