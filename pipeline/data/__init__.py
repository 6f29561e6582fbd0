"""Task data: sources -> seeded index -> datasets read lazily, with the backbone's transforms."""
from pipeline.data.config import DataOptions, SourceConfig, TaskConfig
from pipeline.data.dataset import BadImages, BadSample, Batch, SeededBatches, Split, TaskData, TaskDataset
from pipeline.data.errors import DataError
from pipeline.data.shifts import SHIFTS, lowres, negative, sketch, texture
from pipeline.data.sources import FASHION_MNIST_ROOT, Pools, open_source
from pipeline.data.tasks import TaskIndex, build_index, load_task, task_data
from pipeline.data.transforms import Preprocess, ToInput

__all__ = ["DataOptions", "SourceConfig", "TaskConfig", "BadImages", "BadSample", "Batch", "SeededBatches", "Split",
           "TaskData", "TaskDataset", "DataError", "SHIFTS", "lowres", "negative", "sketch", "texture",
           "FASHION_MNIST_ROOT", "Pools", "open_source", "TaskIndex", "build_index", "load_task", "task_data",
           "Preprocess", "ToInput"]
