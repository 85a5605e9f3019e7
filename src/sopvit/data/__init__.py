"""Data pipeline: multi-crop augmentation (per-sample and batched), iBOT masks, data sets, collation."""

from sopvit.data.batched import BatchMultiCrop
from sopvit.data.datasets import DATASET_NAMES, InMemoryDataset, build_dataset, load_cifar
from sopvit.data.eval_transforms import EvalTransform
from sopvit.data.fashion_mnist import load_fashion_mnist, read_idx
from sopvit.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, scan_images
from sopvit.data.masking import BlockMaskGenerator
from sopvit.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropSpec,
    MultiCropTransform,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "BatchMultiCrop",
    "BlockMaskGenerator",
    "EvalTransform",
    "ImageFolderDataset",
    "InMemoryDataset",
    "MultiCropSpec",
    "MultiCropTransform",
    "build_dataset",
    "load_cifar",
    "load_fashion_mnist",
    "read_idx",
    "scan_images",
]
