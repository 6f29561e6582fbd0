"""Task data: sources -> seeded splits -> images at the backbone's input size."""
from pipeline.data.config import SourceConfig, TaskConfig
from pipeline.data.shifts import SHIFTS, lowres, negative, sketch, texture
from pipeline.data.sources import FASHION_MNIST_ROOT, DataError
from pipeline.data.tasks import Split, TaskData, load_task, normalise

__all__ = ["SourceConfig", "TaskConfig", "SHIFTS", "lowres", "negative", "sketch", "texture", "FASHION_MNIST_ROOT",
           "DataError", "Split", "TaskData", "load_task", "normalise"]
