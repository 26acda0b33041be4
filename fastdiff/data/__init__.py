from fastdiff.data.datasets import DATASETS, ImageData, load_dataset

__all__ = ["DATASETS", "ImageData", "load_dataset"]
