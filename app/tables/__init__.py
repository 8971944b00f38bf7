"""All tables, imported together so metadata is complete for the API, workers and Alembic."""

from app.tables.api_key import ApiKey
from app.tables.base import Base, new_id, utcnow
from app.tables.dataset import Dataset
from app.tables.job import Job
from app.tables.metric_point import MetricPoint
from app.tables.probe import Probe
from app.tables.run import Run
from app.tables.weights import Weights

__all__ = [
    "ApiKey",
    "Base",
    "Dataset",
    "Job",
    "MetricPoint",
    "Probe",
    "Run",
    "Weights",
    "new_id",
    "utcnow",
]
