"""Training data: image sources (image folders, SRN cars, digits, tfds, Hugging Face), k-diffusion's Karras
augmentation in numpy, and grain pipelines with seeded shuffling, per-host shards and checkpointable iterators."""

from .augmentation import KarrasAugment, apply_augmentation, draw_augmentation
from .pipeline import TrainIterator, make_eval_images, make_train_iterator
from .sources import DatasetError, make_source

__all__ = ['DatasetError', 'KarrasAugment', 'TrainIterator', 'apply_augmentation', 'draw_augmentation',
           'make_eval_images', 'make_source', 'make_train_iterator']
