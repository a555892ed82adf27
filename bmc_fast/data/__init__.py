"""The data layer: tasks with local labels, streams that give each task a range of one shared
head, the embedded demo stream, and the AutoDS feature loaders (converted, memory-mapped)."""
from .autods import convert_autods, load_autods, load_features
from .demo import demo_stream
from .tasks import Task, TaskStream

__all__ = ["Task", "TaskStream", "demo_stream", "convert_autods", "load_autods", "load_features"]
